"""Classification training data: position-seeded augmentation whose RandAug magnitude comes from
the curriculum with every sample (ImageFolder listing and the evaluation transform live in
engine.data)."""
from __future__ import annotations

import random
from typing import Sequence, Tuple

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from PIL import Image
from torchvision import transforms

from engine.data import IMAGENET_MEAN, SkippingImageDataset


class CurriculumTrainDataset(SkippingImageDataset):
    """Indexed by (index, stream position, magnitude, stage size): RandomResizedCrop (bicubic) to
    the final size, flip, RandAugment at the given magnitude and, with ``lanczos_to_stage``, a
    Lanczos resize to the stage size; returns (uint8 image, label, bad files skipped).
    All randomness is seeded by the stream position (exact resume, any worker count)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], size: int, randaug: str,
                 scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5, seed: int = 0,
                 lanczos_to_stage: bool = False) -> None:
        super().__init__(files)
        self.labels, self.seed, self.lanczos_to_stage = list(labels), seed, lanczos_to_stage
        self.crop = RandomResizedCropAndInterpolation(size, scale=tuple(scale), interpolation="bicubic")
        self.flip = transforms.RandomHorizontalFlip(hflip)
        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}
        self.randaug = rand_augment_transform(randaug, hparams) if randaug else None
        if self.randaug is not None:
            for op in self.randaug.ops:
                # Pillow >= 13 rejects posterize(bits=0), which timm's PosterizeIncreasing reaches at
                # magnitude 10 (m=9 + noise): cap that op just below, keeping at least 1 bit
                if op.name.startswith("Posterize"):
                    op.magnitude_max = 9.99

    def set_magnitude(self, m: float) -> None:
        """The curriculum's RandAug magnitude for this sample (replaces the m of the spec)."""
        if self.randaug is not None:
            for op in self.randaug.ops:
                op.magnitude = m

    def __getitem__(self, key: Tuple[int, int, float, int]):
        idx, pos, magnitude, stage_size = key    # the stage size is applied on the device unless lanczos_to_stage
        img, used, skipped = self.load(idx)
        s = self.seed * 1_000_003 + pos
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        torch.manual_seed(s)
        img = self.flip(self.crop(img))
        if self.randaug is not None:
            self.set_magnitude(magnitude)
            img = self.randaug(img)
        if self.lanczos_to_stage and stage_size != img.size[0]:
            # EfficientTrain++: Resize(stage size, LANCZOS) after RandAug, as torchvision's Resize
            # does it on a PIL image; erasing then runs on the device at the stage size
            img = img.resize((stage_size, stage_size), Image.LANCZOS)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return arr, self.labels[used], skipped


def collate_train(items) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items], dtype=torch.int64),
            torch.tensor([i[2] for i in items], dtype=torch.int64))
