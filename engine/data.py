"""Image data for any job: where the bytes come from (files, a file list or tar shards), and
loading that skips unreadable images.

An :class:`ImageSource` is an indexed collection of encoded images: ``len(source)``,
``source.read(i)`` (the file's bytes) and ``source.name(i)`` (for messages). Datasets index it by
position, so the position-seeded sample order and exact resume work the same for every source.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import List, Protocol, Sequence, Tuple, runtime_checkable

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A data path whose files cannot be used as given (says what is wrong and what is allowed)."""


@runtime_checkable
class ImageSource(Protocol):
    """Indexed encoded images (a folder's files, a path list, tar shards)."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i`` (raises ``OSError`` when they cannot be read)."""

    def name(self, i: int) -> str:
        """A human-readable name of image ``i`` (its path, or ``shard.tar:member``)."""


class FileSource:
    """Images stored as individual files."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> bytes:
        with open(self.files[i], "rb") as f:
            return f.read()

    def name(self, i: int) -> str:
        return self.files[i]

    def describe(self) -> str:
        return f"{len(self.files)} image files"


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
        raise FileNotFoundError(f"data path {path!r} is neither a folder, a .txt file listing images, "
                                f"nor tar shards (a .tar file, a folder of .tar files or a pattern "
                                f"like shards-{{000000..000009}}.tar)")
    if not files:
        raise FileNotFoundError(f"no images found in {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def open_image_source(path: str) -> ImageSource:
    """The source behind a ``data.path``: tar shards (a ``.tar`` file, a brace pattern
    ``shards-{000000..000099}.tar`` or a folder holding only ``.tar`` files, see
    :mod:`engine.shards`), else image files (a folder tree or a ``.txt`` list)."""
    from .shards import TarShardSource, is_shard_path

    if is_shard_path(path):
        return TarShardSource.open(path)
    return FileSource(list_images(path))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes with PIL, converted to RGB (what the CPU data path trains on)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class SkippingImageDataset(torch.utils.data.Dataset):
    """Base for datasets over an :class:`ImageSource` (or a list of paths): an unreadable image is
    skipped (the next one is used), warned about once and counted, so one corrupt JPEG never kills
    a week-long run."""

    def __init__(self, source, max_skips: int = 50) -> None:
        self.source: ImageSource = source if isinstance(source, ImageSource) else FileSource(source)
        self.max_skips = max_skips
        self._warned: set = set()

    def __len__(self) -> int:
        return len(self.source)

    def warn_unreadable(self, i: int, err: BaseException) -> None:
        if i not in self._warned:
            self._warned.add(i)
            warnings.warn(f"skipping unreadable image {self.source.name(i)}: {type(err).__name__}: {err}")

    def give_up(self, idx: int) -> RuntimeError:
        return RuntimeError(f"{self.max_skips + 1} consecutive unreadable images from {self.source.name(idx)}; "
                            "check the dataset")

    def load(self, idx: int, first_skip: int = 0) -> Tuple[Image.Image, int, int]:
        """(RGB image, index actually used, images skipped to get it), trying ``idx + first_skip``
        first (``first_skip``: images before it already found unreadable, counted in the result)."""
        for skipped in range(first_skip, self.max_skips + 1):
            i = (idx + skipped) % len(self.source)
            try:
                return decode_rgb(self.source.read(i)), i, skipped
            except Exception as e:  # unreadable or corrupt: skip it, count it, warn once
                self.warn_unreadable(i, e)
        raise self.give_up(idx)
