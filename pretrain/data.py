"""MAE pretraining data: image lists, position-seeded augmentation on CPU workers, uint8 batches.

Augmentation (MAE): RandomResizedCrop to the FINAL size (scale 0.2-1, ratio 3/4-4/3, bicubic) and
a horizontal flip, seeded by the sample's stream position so resumed runs are exact. Batches
leave the workers as uint8 [N, 3, S, S]; normalisation and the low-frequency crop to the stage
size happen on the device. With ``lowfreq=cpu-lanczos`` (the official ET++ approximation) the
workers also Lanczos-resize to the stage size.
"""
from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from engine.data import SkippingImageDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class MAEPretrainDataset(SkippingImageDataset):
    """Indexed by (dataset index, stream position, magnitude); returns (uint8 image, bad files skipped)."""

    def __init__(self, files: Sequence[str], size: int, scale: Sequence[float] = (0.2, 1.0), seed: int = 0,
                 stage_size: Optional[int] = None) -> None:
        super().__init__(files)
        self.size, self.scale, self.seed, self.stage_size = size, tuple(scale), seed, stage_size

    def __getitem__(self, key: Tuple[int, int, float]) -> Tuple[torch.Tensor, int]:
        idx, pos = key[0], key[1]   # MAE augmentation has no magnitude (key[2])
        img, _, skipped = self.load(idx)
        rng = random.Random(self.seed * 1_000_003 + pos)
        top, left, h, w = rrc_params(rng, img.width, img.height, self.scale)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.stage_size is not None and self.stage_size != self.size:
            img = img.resize((self.stage_size, self.stage_size), Image.LANCZOS)
        return to_uint8_tensor(img), skipped


def collate(items: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.stack([it[0] for it in items])
    bad = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return imgs, bad


def normalize(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] on any device -> float32 normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.float() / 255.0 - mean) / std


def center_crop_tensor(path: str, size: int) -> torch.Tensor:
    """Deterministic view of an image for pictures: short side to ``size``, centre crop, uint8."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    s = size / min(img.width, img.height)
    img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_uint8_tensor(img.crop((left, top, left + size, top + size)))
