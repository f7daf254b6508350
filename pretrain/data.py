"""MAE pretraining data: position-seeded RandomResizedCrop + flip, decoded by PIL in the CPU workers
or by NVIDIA DALI in the training process.

Augmentation (MAE): RandomResizedCrop to the FINAL size (scale 0.2-1, ratio 3/4-4/3, bicubic) and
a horizontal flip, both drawn from an RNG seeded by the sample's stream position, so resumed runs
are exact and the two decode paths crop identically:

- ``decode=cpu``: workers decode with PIL, crop, resize and flip; batches leave them as uint8
  [N, 3, S, S]. With ``lowfreq=cpu-lanczos`` (the official ET++ approximation) they also
  Lanczos-resize to the stage size, which travels with every sample key.
- ``decode=dali``: workers read the file bytes and the JPEG header only (image size, for the
  crop box) and send an :class:`engine.decode.EncodedBatch`; a DALI pipeline in the training
  process decodes the box, resizes and flips it (:class:`engine.decode.DaliDecoder`; nvJPEG on
  CUDA, DALI's CPU backend otherwise). Non-JPEG, CMYK and truncated files take the CPU path in
  the worker; JPEGs DALI refuses take it in the training process.

Normalisation and the low-frequency crop to the stage size happen on the device (the task).
"""
from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from engine.data import SkippingImageDataset, decode_rgb
from engine.decode import EncodedSample, collate_encoded, jpeg_complete, jpeg_header

DECODE_MODES = ("auto", "cpu", "dali", "device")     # device: the former name of dali (old configs, checkpoints)
DATASET_DECODES = ("cpu", "dali")


def rrc_params(rng: random.Random, width: int, height: int, scale: Sequence[float],
               ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): torchvision's algorithm with an explicit RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


Key = Tuple[int, int, float, int]     # (dataset index, stream position, magnitude, stage size)


class MAEPretrainDataset(SkippingImageDataset):
    """Indexed by sample keys (dataset index, stream position, magnitude, stage size).

    ``decode='cpu'``: returns (uint8 image, files skipped); ``decode='dali'`` (or its former name
    ``'device'``): returns an :class:`engine.decode.EncodedSample`. Use :meth:`collate` for either.
    """

    def __init__(self, source, size: int, scale: Sequence[float] = (0.2, 1.0), seed: int = 0,
                 lanczos_to_stage: bool = False, decode: str = "cpu") -> None:
        super().__init__(source)
        decode = "dali" if decode == "device" else decode
        if decode not in DATASET_DECODES:
            raise ValueError(f"decode must be one of {DATASET_DECODES}, got {decode!r}")
        self.size, self.scale, self.seed = size, tuple(scale), seed
        self.lanczos_to_stage, self.decode = lanczos_to_stage, decode

    def augmentation(self, width: int, height: int, position: int) -> Tuple[Tuple[int, int, int, int], bool]:
        """The crop box (top, left, h, w) and flip of the sample at ``position``."""
        rng = random.Random(self.seed * 1_000_003 + position)
        box = rrc_params(rng, width, height, self.scale)
        return box, rng.random() < 0.5

    def crop_resize_flip(self, img: Image.Image, position: int, stage_size: Optional[int] = None) -> torch.Tensor:
        """The CPU path for a decoded image: PIL bicubic crop-resize, flip (and Lanczos to the stage size)."""
        (top, left, h, w), flip = self.augmentation(img.width, img.height, position)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if stage_size is not None and stage_size != self.size:
            img = img.resize((stage_size, stage_size), Image.LANCZOS)
        return to_uint8_tensor(img)

    def cpu_item(self, idx: int, position: int, stage_size: Optional[int] = None,
                 first_skip: int = 0) -> Tuple[torch.Tensor, int]:
        """(uint8 [3, S, S], files skipped): the whole CPU path for one sample."""
        img, _, skipped = self.load(idx, first_skip)
        return self.crop_resize_flip(img, position, stage_size), skipped

    def encoded_item(self, idx: int, position: int) -> EncodedSample:
        """Bytes + crop for JPEGs DALI decodes; the CPU path's result for anything else (not JPEG,
        CMYK, or no end-of-image marker: PIL decides about truncated files, as on the CPU path)."""
        n = len(self.source)
        for skipped in range(self.max_skips + 1):
            i = (idx + skipped) % n
            try:
                data = self.source.read(i)
            except OSError as e:
                self.warn_unreadable(i, e)
                continue
            header = jpeg_header(data)
            if header is not None and header.device_decodable and jpeg_complete(data):
                box, flip = self.augmentation(header.width, header.height, position)
                return EncodedSample(np.frombuffer(data, dtype=np.uint8), box, flip, i, position, skipped,
                                     hw=(header.height, header.width))
            try:
                img = decode_rgb(data)
            except Exception as e:  # unreadable: skip and count, as the CPU path
                self.warn_unreadable(i, e)
                continue
            return EncodedSample(None, (0, 0, 0, 0), False, i, position, skipped,
                                 image=self.crop_resize_flip(img, position))
        raise self.give_up(idx)

    def __getitem__(self, key: Key) -> Union[Tuple[torch.Tensor, int], EncodedSample]:
        idx, pos, size = key[0], key[1], key[3]   # MAE augmentation has no magnitude (key[2])
        if self.decode == "dali":
            return self.encoded_item(idx, pos)
        return self.cpu_item(idx, pos, size if self.lanczos_to_stage else None)

    def fallback(self, idx: int, position: int) -> Tuple[torch.Tensor, int]:
        """The CPU path for a file DALI refused (see :class:`engine.decode.DaliDecoder`)."""
        return self.cpu_item(idx, position)

    def collate(self, items: List) -> tuple:
        if self.decode == "dali":
            return tuple(collate_encoded(items))
        return collate(items)


def collate(items: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.stack([it[0] for it in items])
    bad = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return imgs, bad


def center_crop_tensor(data: bytes, size: int) -> torch.Tensor:
    """Deterministic view of an encoded image for pictures: short side to ``size``, centre crop, uint8."""
    img = decode_rgb(data)
    s = size / min(img.width, img.height)
    img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_uint8_tensor(img.crop((left, top, left + size, top + size)))
