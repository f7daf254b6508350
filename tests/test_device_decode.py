"""The device data path (engine.decode, engine.resample, pretrain.data decode=device) against the
CPU path (PIL), run here with device=cpu: same crops and flips, PIL's pixels, fallbacks, skipping.

Tolerances: in float64 the batched resize equals PIL's fixed-point resize byte for byte; float32
(the CPU default) may differ by one level on a few pixels in 100,000; float16 (the CUDA default)
rounds the weights to 11 bits: at most 2 levels on a few percent of pixels, mean below 0.15 levels
(a quality-90 JPEG's own error is several levels). torchvision's CPU decoder is libjpeg-turbo, as
PIL's: decoded pixels are equal (nvJPEG on CUDA is not tested here).
"""
import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import decode as decode_mod
from engine.decode import DeviceDecoder, EncodedBatch, collate_encoded, jpeg_header
from engine.resample import resized_crops, vertical_first
from engine.data import Normalizer
from pretrain.data import MAEPretrainDataset, collate, rrc_params
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


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    arrays = [smooth_image(rng, h, w) for h, w in SHAPES for _ in range(3)]
    boxes, flips = [], []
    for k, a in enumerate(arrays):
        r = random.Random(k)
        boxes.append(rrc_params(r, a.shape[1], a.shape[0], (0.08, 1.0)))
        flips.append(r.random() < 0.5)
    return arrays, boxes, flips


@pytest.mark.parametrize("size", [224, 24])
def test_resize_is_pil_exact_in_float64(crops, size):
    arrays, boxes, flips = crops
    assert {vertical_first(a.shape[0], a.shape[1], size, size) for a in arrays} == {True, False}  # both pass orders
    ref = pil_reference(arrays, boxes, flips, size)
    out = resized_crops([torch.from_numpy(a).permute(2, 0, 1) for a in arrays], torch.tensor(boxes), size,
                        torch.tensor(flips), dtype=torch.float64, max_pixels=200_000)   # several groups
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    assert torch.equal(out, ref)


def test_resize_tolerance_in_float32_and_float16(crops):
    arrays, boxes, flips = crops
    ref = pil_reference(arrays, boxes, flips, 112).int()
    imgs = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    d32 = (resized_crops(imgs, torch.tensor(boxes), 112, torch.tensor(flips), dtype=torch.float32).int() - ref).abs()
    assert d32.max() <= 1 and (d32 > 0).float().mean() < 1e-3
    d16 = (resized_crops(imgs, torch.tensor(boxes), 112, torch.tensor(flips), dtype=torch.float16).int() - ref).abs()
    assert d16.max() <= 2 and d16.float().mean() < 0.15
    assert d16.float().mean() > 0            # float16 really is the approximate one (the test can tell)


def test_resize_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r"boxes must have shape \(1, 4\)"):
        resized_crops([torch.zeros(3, 8, 8, dtype=torch.uint8)], torch.zeros(2, 4), 4)


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


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """JPEGs (RGB, grayscale, progressive, CMYK), a PNG, a truncated JPEG and a non-image."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(2)
    files = {}
    for k, (h, w) in enumerate([(60, 80), (80, 50), (45, 45), (70, 90), (50, 100), (64, 48)]):
        files[f"a{k}.jpg"] = jpeg_bytes(smooth_image(rng, h, w))
    files["b_gray.jpg"] = jpeg_bytes(smooth_image(rng, 50, 70)[..., 1])
    files["c_prog.jpg"] = jpeg_bytes(smooth_image(rng, 66, 52), progressive=True)
    b = io.BytesIO()
    Image.fromarray(smooth_image(rng, 40, 60)).convert("CMYK").save(b, "JPEG")
    files["d_cmyk.jpg"] = b.getvalue()
    b = io.BytesIO()
    Image.fromarray(smooth_image(rng, 55, 44)).save(b, "PNG")
    files["e.png"] = b.getvalue()
    full = jpeg_bytes(smooth_image(rng, 60, 60))
    files["f_truncated.jpg"] = full[: len(full) // 2]
    files["g_garbage.jpg"] = b"this is not an image"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(str(p) for p in root.iterdir())


def both_paths(files, keys, dtype=None, size=32):
    cpu = MAEPretrainDataset(files, size, decode="cpu", seed=3)
    dev = MAEPretrainDataset(files, size, decode="device", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_imgs, ref_bad = cpu.collate([cpu[k] for k in keys])
        items = [dev[k] for k in keys]
    batch = dev.collate(items)
    decoder = DeviceDecoder(size, torch.device("cpu"), dev.fallback, dtype=dtype)
    out, skipped = decoder(EncodedBatch(*batch))
    return cpu, dev, items, batch, decoder, (ref_imgs, ref_bad), (out, skipped)


def test_device_path_matches_cpu_path(mixed_folder):
    n = len(mixed_folder)
    keys = [(i, 100 + 7 * i, 0.0, 32) for i in range(n)] + [(i, 999 + i, 0.0, 32) for i in range(n)]
    cpu, dev, items, batch, decoder, (ref, ref_bad), (out, skipped) = both_paths(mixed_folder, keys, torch.float64)
    # same file, crop box and flip for every JPEG sample, from the header alone
    for k, it in zip(keys, items):
        if it.image is None:
            with Image.open(mixed_folder[it.index]) as im:
                assert (it.box, it.flip) == dev.augmentation(im.width, im.height, k[1])
    # CMYK and PNG came ready from the worker (CPU path); the non-image was skipped there; the
    # truncated JPEG's header is intact, so only the decode finds it out (then PIL skips it)
    names = [Path(mixed_folder[it.index]).name for it in items]
    ready = {names[k] for k in batch[7].tolist()}
    assert ready == {"d_cmyk.jpg", "e.png"}
    assert "g_garbage.jpg" not in names and names.count("f_truncated.jpg") == 2
    # pixels: PIL's exactly (float64), and the same number of skipped files
    assert torch.equal(out, ref)
    assert int(batch[-1].sum()) + skipped == int(ref_bad.sum()) == 6 and skipped == 4
    assert decoder.worker_decoded == 4 and decoder.fallbacks == 2


def test_device_path_default_dtype_within_one_level(mixed_folder):
    keys = [(i, 5 * i, 0.0, 48) for i in range(len(mixed_folder))]
    *_, (ref, _), (out, _) = both_paths(mixed_folder, keys, None, size=48)
    assert (out.int() - ref.int()).abs().max() <= 1


def test_refused_image_falls_back_to_pil_for_that_image_only(mixed_folder, monkeypatch):
    """A decoder refusal (e.g. nvJPEG and a progressive file) costs one image a PIL decode,
    counted and warned about; a truncated JPEG whose header parses is skipped as on the CPU path."""
    real = decode_mod._decode_jpeg

    def picky(datas, device):
        if any(jpeg_header(bytes(d.numpy())).progressive for d in datas):
            raise RuntimeError("nvjpeg refuses progressive")
        return real(datas, device)

    monkeypatch.setattr(decode_mod, "_decode_jpeg", picky)
    files = [f for f in mixed_folder if Path(f).name in ("a0.jpg", "c_prog.jpg", "a1.jpg")]
    keys = [(i, 40 + i, 0.0, 32) for i in range(len(files))]
    with pytest.warns(UserWarning, match="device JPEG decode failed .*nvjpeg refuses progressive"):
        *_, decoder, (ref, _), (out, skipped) = both_paths(files, keys, torch.float64)
    assert decoder.fallbacks == 1 and torch.equal(out, ref) and skipped == 0

    # a JPEG whose header is fine but whose data is cut: the device decode fails, PIL fails, the next file is used
    trunc = [f for f in mixed_folder if Path(f).name in ("f_truncated.jpg", "a2.jpg")]
    keys = [(0, 11, 0.0, 32), (1, 12, 0.0, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        *_, batch, decoder, (ref, ref_bad), (out, skipped) = both_paths(trunc, keys, torch.float64)
    assert Path(trunc[int(batch[4][1])]).name == "f_truncated.jpg"      # the worker could not tell
    assert torch.equal(out, ref) and int(batch[-1].sum()) + skipped == int(ref_bad.sum()) == 1


def test_device_errors_are_raised_not_taken_for_bad_files(mixed_folder, monkeypatch):
    def oom(datas, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(decode_mod, "_decode_jpeg", oom)
    ds = MAEPretrainDataset(mixed_folder[:2], 32, decode="device")
    dec = DeviceDecoder(32, torch.device("cpu"), ds.fallback)
    with pytest.raises(torch.OutOfMemoryError):
        dec(EncodedBatch(*ds.collate([ds[(i, i, 0.0, 32)] for i in range(2)])))
    assert dec.fallbacks == 0
    with pytest.raises(torch.OutOfMemoryError):
        dec.check()


def test_worker_count_does_not_change_device_batches(mixed_folder):
    ds = MAEPretrainDataset(mixed_folder, 32, decode="device", seed=1)
    sampler = [[(i % len(mixed_folder), i, 0.0, 32) for i in range(b, b + 4)] for b in range(0, 24, 4)]

    def run(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=ds.collate)
        dec = DeviceDecoder(32, torch.device("cpu"), ds.fallback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [dec(EncodedBatch(*b))[0] for b in loader]

    a, b = run(0), run(2)
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_collate_packs_bytes_into_one_tensor(mixed_folder):
    ds = MAEPretrainDataset(mixed_folder[:3], 16, decode="device")
    items = [ds[(i, i, 0.0, 16)] for i in range(3)]
    b = collate_encoded(items)
    assert b.data.dtype == torch.uint8 and b.data.dim() == 1
    assert b.offsets.tolist() == [0] + list(np.cumsum([len(it.data) for it in items]))
    assert bytes(b.data[b.offsets[1]:b.offsets[2]].numpy()) == Path(mixed_folder[items[1].index]).read_bytes()


def test_normalising_after_the_crop_equals_normalising_before():
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    norm = Normalizer("cpu")
    before = low_frequency_crop(norm(x), 24)
    after = norm(low_frequency_crop(x.float(), 24))
    torch.testing.assert_close(after, before, atol=2e-5, rtol=0)
    ref = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_and_resize_stay_close_to_pil(mixed_folder):
    """nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, and the resize runs in
    float16: stated tolerance mean <= 1 level, max <= 16 levels (edges), same crops and skips."""
    dev = MAEPretrainDataset(mixed_folder, 48, decode="device", seed=3)
    cpu = MAEPretrainDataset(mixed_folder, 48, decode="cpu", seed=3)
    keys = [(i, 50 + i, 0.0, 48) for i in range(len(mixed_folder))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_bad = cpu.collate([cpu[k] for k in keys])
        batch = dev.collate([dev[k] for k in keys])
        out, skipped = DeviceDecoder(48, torch.device("cuda"), dev.fallback)(EncodedBatch(*batch))
    d = (out.cpu().int() - ref.int()).abs().float()
    assert d.mean() <= 1.0 and d.max() <= 16
    assert int(batch[-1].sum()) + skipped == int(ref_bad.sum())
