"""Image files on disk: the extensions that count as images, listing a folder tree or a ``.txt``
list of them, and :class:`DataError`. The bottom of the data modules: :mod:`engine.shards` and
:mod:`engine.data` both build on it (``engine.data`` keeps these names: import them from either).
"""
from __future__ import annotations

import os
from typing import List

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A data path whose files cannot be used as given (says what is wrong and what is allowed)."""


# public data sets the shipped configs name (configs/*/imagenette64_*, configs/*/_imagenet.yaml): what
# a missing folder of theirs is and where to get it (the configs' header comments say the same)
PUBLIC_DATASETS = (
    ("imagenette", "Imagenette2 (fast.ai: 10 ImageNet classes, 9,469 train / 3,925 val images, ImageFolder "
                   "train/<wnid>/ and val/<wnid>/)",
     "https://github.com/fastai/imagenette (the 160 px download "
     "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz is enough at 64 px; the recorded studies read "
     "a copy resized to 112x112)"),
    ("imagenet", "ImageNet-1K (ILSVRC 2012, 1,000 classes, ImageFolder train/<wnid>/ and val/<wnid>/ with the "
                 "validation images sorted into class folders)",
     "https://image-net.org/download.php (registration; the terms of use apply)"),
)


def public_dataset_hint(path: str) -> str:
    """For a missing data folder whose name says which public data set a config expects there
    (``imagenette``, ``imagenet``): the sentence naming the set, where to get it and the folder
    expected; "" for any other path."""
    name = path.replace("\\", "/").lower()
    root = os.path.normpath(path)
    if os.path.basename(root) in ("train", "val"):         # data.path = <set>/train: the set is its parent
        root = os.path.dirname(root) or root
    for key, what, where in PUBLIC_DATASETS:
        if key in name:
            placeholder = "/path/to/" in name
            return (f"; this config expects {what}" + (" at a path you give" if placeholder else f" in {root}")
                    + f": get it from {where} and unpack it"
                    + (" (a folder holding train/ and val/), then point the config at it (data.path=..., or data=... "
                       "for a study)" if placeholder else
                       f" so that {root} holds train/ and val/ (move or link the unpacked folder there), or point the "
                       "config at where it is (data.path=..., or data=... for a study)"))
    return ""


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
        what = "does not exist" if not os.path.exists(path) else "is not a folder, a .txt file or tar shards"
        raise FileNotFoundError(f"data path {path!r} (data.path) {what}; allowed: an image folder, a .txt file "
                                f"listing images, or tar shards (a .tar file, a folder of .tar files or a pattern "
                                f"like shards-{{000000..000009}}.tar)"
                                + (public_dataset_hint(path) if not os.path.exists(path) else ""))
    if not files:
        raise FileNotFoundError(f"no images found in {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files
