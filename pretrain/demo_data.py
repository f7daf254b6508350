"""The bundled demo image set: deterministic 'dead leaves' pictures with a labelled foreground.

Each image is a dead-leaves composition (occluding discs and rectangles of random colours with a
power-law size distribution, the classic model of natural-image statistics) with one larger
striped foreground object on top. The label is the object's shape (disc, square, triangle,
cross); each class also has its own stripe direction (0, 45, 90, 135 degrees, jittered) and
stripe colour family (red, green, blue, yellow, jittered; the background uses every colour),
cues that a small model fine-tuned for a minute or two picks up, so the demo learns something. Layout: ``root/{train,val}/<class>/*.png``.
"""
from __future__ import annotations

import os
import shutil
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw

from engine.data import DataError

CLASSES = ("disc", "square", "triangle", "cross")
_STAMP = ".complete"
DEMO_VERSION = 2   # bump when the generator changes, so existing demo sets are regenerated


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


_CLASS_HUES = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (235, 210, 40))   # red, green, blue, yellow


def _class_colour(rng: np.random.Generator, label: int, dark: bool = False) -> np.ndarray:
    """A jittered colour of the class's hue family (a darker shade for the second stripe colour)."""
    base = np.array(_CLASS_HUES[label], dtype=np.float64) * (0.45 if dark else 1.0)
    return np.clip(base + rng.normal(0, 18, size=3), 0, 255)


def _dead_leaves(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(25, 60))):
        r = size * 0.5 * float(rng.pareto(2.0) + 1.0) ** -1.5     # many small, few large leaves
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * size
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=_colour(rng))
    return img


def _foreground(rng: np.random.Generator, img: Image.Image, label: int) -> None:
    size = img.width
    r = size * float(rng.uniform(0.22, 0.34))
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15, size=2) * size
    mask = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(mask)
    if CLASSES[label] == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif CLASSES[label] == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif CLASSES[label] == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    # striped texture in two colours, random orientation and period
    yy, xx = np.mgrid[0:size, 0:size]
    theta = label * np.pi / len(CLASSES) + rng.uniform(-0.15, 0.15)   # each class has its stripe direction
    period = rng.uniform(4, 9)
    stripes = (np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period) > 0)[..., None]
    tex = np.where(stripes, _class_colour(rng, label), _class_colour(rng, label, dark=True)).astype(np.uint8)
    img.paste(Image.fromarray(tex), (0, 0), mask)


def demo_dataset_exists(root: str) -> bool:
    """Whether ``root`` holds a finished generated demo set (of any size)."""
    return os.path.isfile(os.path.join(root, _STAMP))


def generate_demo_dataset(root: str, num_images: int = 1200, size: int = 96, val_fraction: float = 0.2,
                          seed: int = 0, reuse_any: bool = False) -> str:
    """Write the demo set under ``root`` (idempotent: a finished set is left alone; one generated
    with other parameters is regenerated, unless ``reuse_any``: a caller that only needs some
    demo set, like the fine-tuning demo, keeps the one it finds). Returns root."""
    stamp = f"demo v{DEMO_VERSION}: {num_images} images, size {size}, seed {seed}\n"
    stamp_path = os.path.join(root, _STAMP)
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if reuse_any or f.read() == stamp:
                return root
        shutil.rmtree(root)          # an older or different demo set: regenerate it
    elif os.path.isdir(root) and os.listdir(root):
        raise DataError(f"data.path {root!r} exists and is not a generated demo set, but data.demo=true would "
                        "generate one there; set data.demo=false to train on that folder, or choose another "
                        "data.path for the demo set")
    print(f"generating the demo image set in {root} ({num_images} images) ...", flush=True)
    rng = np.random.default_rng(seed)
    n_val = int(num_images * val_fraction)
    for k in range(num_images):
        split = "val" if k < n_val else "train"
        label = k % len(CLASSES)
        img = _dead_leaves(rng, size)
        _foreground(rng, img, label)
        folder = os.path.join(root, split, CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{k:05d}.png"))
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return root
