"""Image data for any job: where the bytes come from (files, a file list or tar shards), loading
that skips unreadable images, labelled ImageFolder trees with the standard evaluation transform,
and the ImageNet normalisation every job applies on its device.

An :class:`ImageSource` is an indexed collection of encoded images: ``len(source)``,
``source.read(i)`` (the file's bytes) and ``source.name(i)`` (for messages). Datasets index it by
position, so the position-seeded sample order and exact resume work the same for every source.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import List, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
from PIL import Image
from torchvision import transforms

from .images import (IMAGE_EXTENSIONS, DataError, list_images,  # noqa: F401 (engine.data's names too)
                     public_dataset_hint)
from .shards import TarShardSource, is_shard_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def open_image_source(path: str) -> ImageSource:
    """The source behind a ``data.path``: tar shards (a ``.tar`` file, a brace pattern
    ``shards-{000000..000099}.tar`` or a folder holding only ``.tar`` files, see
    :mod:`engine.shards`), else image files (a folder tree or a ``.txt`` list)."""
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


def image_folder(root: str, what: str = "") -> Tuple[List[str], List[int], List[str]]:
    """(files, labels, class names) of an ImageFolder tree ``root/<class>/<images>``; ``what``
    names the settings the path came from in the error (e.g. ``data.path + data.val_dir``)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r}{f' ({what})' if what else ''} is not a folder (expected ImageFolder "
                                f"layout: {root}/<class>/<images>)"
                                + (public_dataset_hint(root) if not os.path.exists(root) else ""))
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for label, c in enumerate(classes):
        for dirpath, dirnames, names in os.walk(os.path.join(root, c), followlinks=True):
            dirnames.sort()
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(label)
    if not files:
        raise FileNotFoundError(f"no images found under {root!r} (expected {root}/<class>/<images>)")
    return files, labels, classes


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], train: str, val: str) -> None:
    """Labels are class indices: a training and a validation tree must list the same class folders."""
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"{train} and {val} must have the same class folders; only in {train}: {only_train[:5]}, "
                        f"only in {val}: {only_val[:5]}")


def eval_transform(size: int, crop_pct: float) -> transforms.Compose:
    """Resize the short side to size / crop_pct (bicubic), centre crop ``size``, normalise."""
    return transforms.Compose([
        transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EvalDataset(SkippingImageDataset):
    """Labelled images through a fixed transform (evaluation, feature extraction)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], transform) -> None:
        super().__init__(files)
        self.labels, self.transform = list(labels), transform

    def __getitem__(self, idx: int):
        img, used, _ = self.load(idx)
        return self.transform(img), self.labels[used]


class Normalizer:
    """ImageNet normalisation with its constants created once on the device (no host-to-device
    copy per step). Takes pixel values in 0..255 (uint8 or float): normalising after the
    low-frequency crop is exact, because the crop is linear and keeps constants, and it touches
    a tensor up to 5x smaller."""

    def __init__(self, device: Union[str, torch.device], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * s)).to(device)
        self.shift = (m / s).to(device)
        self.mean, self.std = m.to(device), s.to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 pixels [N, 3, H, W] -> float32 normalised."""
        return x.float() * self.scale - self.shift

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised -> 0..1 (for pictures)."""
        return (x * self.std + self.mean).clamp(0, 1)


SHM = "/dev/shm"


def check_shared_memory(num_workers: int, prefetch: int, batch: int, sample_bytes: int, processes: int = 1,
                        path: str = SHM) -> int:
    """Raise :class:`DataError` when the batches loader workers keep in flight cannot fit in the
    node's shared memory (``path``): ``num_workers x prefetch`` batches of ``batch`` samples of
    ``sample_bytes`` per process, ``processes`` processes on the node. A container's default
    (64 MB) ends in a worker's "bus error" minutes into a run; this says so before it starts.
    Returns the bytes needed (0 without workers: batches stay in the training process)."""
    if num_workers <= 0:
        return 0
    need = num_workers * prefetch * batch * sample_bytes * processes
    try:
        import shutil

        free = shutil.disk_usage(path).free
    except OSError:
        return need                      # no /dev/shm (not Linux): nothing to check against
    if need > free:
        raise DataError(
            f"shared memory: {num_workers} loader worker(s) x prefetch {prefetch} x {batch} samples of "
            f"{sample_bytes / 2 ** 10:.0f} KiB x {processes} process(es) on this node need {need / 2 ** 30:.2f} GiB of "
            f"{path}, which has {free / 2 ** 30:.2f} GiB free. In a container start it with --ipc=host or "
            f"--shm-size={max(1, -(-need * 2 // 2 ** 30))}g; or lower data.num_workers (0 loads in the training "
            "process)")
    return need
