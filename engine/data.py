"""Image files for any job: listing a dataset, and loading that skips unreadable files."""
from __future__ import annotations

import os
import warnings
from typing import List, Sequence, Tuple

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(path: str) -> List[str]:
    """All images under a folder (ImageFolder layout or any tree; sorted), or the paths listed in
    a ``.txt`` file (one per line; relative paths are relative to the file's folder)."""
    if os.path.isfile(path) and path.endswith(".txt"):
        root = os.path.dirname(os.path.abspath(path))
        with open(path, "r", encoding="utf-8") as f:
            files = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        files = [p if os.path.isabs(p) else os.path.join(root, p) for p in files]
    elif os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        raise FileNotFoundError(f"data path {path!r} is neither a folder nor a .txt file listing images")
    if not files:
        raise FileNotFoundError(f"no images found in {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


class SkippingImageDataset(torch.utils.data.Dataset):
    """Base for datasets over image files: an unreadable file is skipped (the next file is used),
    warned about once and counted, so one corrupt JPEG never kills a week-long run."""

    def __init__(self, files: Sequence[str], max_skips: int = 50) -> None:
        self.files, self.max_skips = list(files), max_skips
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, idx: int) -> Tuple[Image.Image, int, int]:
        """(RGB image, index actually used, files skipped to get it)."""
        for skipped in range(self.max_skips + 1):
            i = (idx + skipped) % len(self.files)
            try:
                with Image.open(self.files[i]) as im:
                    return im.convert("RGB"), i, skipped
            except Exception as e:  # unreadable or corrupt: skip it, count it, warn once
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping unreadable image {self.files[i]}: {type(e).__name__}: {e}")
        raise RuntimeError(f"{self.max_skips + 1} consecutive unreadable images from {self.files[idx]}; check the dataset")
