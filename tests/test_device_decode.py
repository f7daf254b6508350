"""The worker's share of the DALI data path (engine.decode: JPEG header, packing a batch's bytes)
and the helpers tests/test_dali.py compares DALI against PIL with (photo-like JPEGs, PIL's
reference crops). The DALI decode itself is tested in tests/test_dali.py; the hand-written
torchvision decode + PIL-exact matmul resize this file used to test was retired for DALI.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.decode import jpeg_header
from engine.data import Normalizer
from efficienttrain.fourier import low_frequency_crop


def smooth_image(rng, h, w):
    """A photo-like image: low-frequency colour field plus mild noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.5, 6) / h, rng.uniform(0.5, 6) / w, rng.uniform(0, 6.3)
            img[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    img = 128 + 40 * img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr, **kw):
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


SHAPES = [(480, 640), (640, 427), (17, 33), (300, 7), (1000, 37), (64, 64), (90, 500)]


def pil_reference(arrays, boxes, flips, size):
    out = []
    for a, (t, l, h, w), f in zip(arrays, boxes, flips):
        im = Image.fromarray(a).resize((size, size), Image.BICUBIC, box=(l, t, l + w, t + h))
        out.append(np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if f else im))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_jpeg_header():
    rng = np.random.default_rng(1)
    rgb = smooth_image(rng, 30, 50)
    h = jpeg_header(jpeg_bytes(rgb))
    assert (h.width, h.height, h.components, h.progressive, h.device_decodable) == (50, 30, 3, False, True)
    h = jpeg_header(jpeg_bytes(rgb, progressive=True))
    assert h.progressive and h.device_decodable and h.sof == 0xC2
    h = jpeg_header(jpeg_bytes(rgb[..., 0]))
    assert h.components == 1 and h.device_decodable
    b = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(b, "JPEG")
    h = jpeg_header(b.getvalue())
    assert h.components == 4 and not h.device_decodable
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None        # header cut before the frame
    assert jpeg_header(b"garbage") is None


def test_normalising_after_the_crop_equals_normalising_before():
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    norm = Normalizer("cpu")
    before = low_frequency_crop(norm(x), 24)
    after = norm(low_frequency_crop(x.float(), 24))
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
    ref = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=0)
