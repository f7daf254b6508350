"""The bundled demo image set: deterministic 'dead leaves' pictures with a labelled foreground.

Each image is a dead-leaves composition (occluding discs and rectangles of random colours with a
power-law size distribution, the classic model of natural-image statistics) with one larger
striped foreground object on top. The label is the object's shape (disc, square, triangle,
cross); each class also has its own stripe direction (0, 45, 90, 135 degrees, jittered) and
stripe colour family (red, green, blue, yellow, jittered; the background uses every colour),
cues that a small model fine-tuned for a minute or two picks up, so the demo learns something. Layout:
``root/{train,val}/<class>/*.png``. It is written only where nothing exists or into a set it
generated (:mod:`engine.generated`): a user's folder is refused, never replaced.
"""
from __future__ import annotations

import os
import re
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw

from engine.generated import Generated, build, check_removable, check_target, is_default

CLASSES = ("disc", "square", "triangle", "cross")
DEFAULT_PATH = "data/demo"   # the demo configs' data.path
DEFAULT_IMAGES = 1200
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


_FILE = re.compile(r"(train|val)/(" + "|".join(CLASSES) + r")/\d{5}\.png")


def _legacy(root: str) -> bool:
    """A finished set written before the marker existed (its stamp; :func:`generated.check_target`
    also requires that it holds only the generator's files)."""
    try:
        with open(os.path.join(root, _STAMP)) as f:
            return f.read().startswith("demo v")
    except OSError:
        return False


def generator(key: str = "data.path") -> Generated:
    """The demo image generator as the setting ``key`` names its folder (``data.path`` in training
    configs, ``data`` in a search's proxy config): the setting's ``demo`` sibling asks for it."""
    demo = key.rsplit(".", 1)[0] + ".demo" if "." in key else "demo"
    return Generated(what="demo set", key=key, by=f"{demo}=true",
                     advice=f"set {demo}=false to use that folder as your data, or choose another {key} for the "
                            "demo set (a folder that does not exist yet)",
                     owns=lambda rel: rel == _STAMP or _FILE.fullmatch(rel) is not None, legacy=_legacy)


def _stamp(num_images: int, size: int, seed: int) -> str:
    return f"demo v{DEMO_VERSION}: {num_images} images, size {size}, seed {seed}\n"


def demo_dataset_status(root: str, num_images: int = DEFAULT_IMAGES, size: int = 96, seed: int = 0,
                        reuse_any: bool = False, key: str = "data.path") -> str:
    """What :func:`generate_demo_dataset` would do at ``root``, without writing: ``"ready"`` (a set
    it keeps), ``"missing"`` (it generates one) or ``"regenerate"`` (it replaces an older set of
    ours); raises :class:`DataError` where it would refuse (a path it did not generate, or a set of
    ours holding a user's file). A dry run's verdict is the real run's."""
    gen = generator(key)
    if check_target(root, gen) == "missing":
        return "missing"
    stamp_path = os.path.join(root, _STAMP)
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if reuse_any or f.read() == _stamp(num_images, size, seed):
                return "ready"
    check_removable(root, gen)
    return "regenerate"


def demo_notice(root: str, status: str, num_images: int, key: str = "data.path", dry_run: bool = False) -> str:
    """The one line said before the set is written (or, in a dry run, that it would be): the
    absolute path and that the pictures are synthetic; louder when ``root`` is not the demo
    configs' own ``data/demo`` (a user's path: the pictures are not their data)."""
    where = os.path.abspath(root)
    verb = {"missing": "generate", "regenerate": "regenerate"}[status]
    why = "; the set there is of an older version or other settings" if status == "regenerate" else ""
    head = (f"dry run: the real run would {verb}" if dry_run else f"{verb[:-1]}ing") + \
        f" the synthetic demo image set in {where} ({num_images} images{why})"
    if is_default(root, DEFAULT_PATH):
        return head + ("" if dry_run else " ...")
    demo = key.rsplit(".", 1)[0] + ".demo" if "." in key else "demo"
    return (f"{head}: {key} is not the demo's own {DEFAULT_PATH}, and {demo}=true writes synthetic pictures there, "
            f"not your data (set {demo}=false to train on images of yours)" + ("" if dry_run else " ..."))


def generate_demo_dataset(root: str, num_images: int = DEFAULT_IMAGES, size: int = 96,
                          val_fraction: float = 0.2, seed: int = 0, reuse_any: bool = False,
                          key: str = "data.path") -> str:
    """Write the demo set under ``root`` (idempotent: a finished set is left alone; one generated
    with other parameters is regenerated, unless ``reuse_any``: a caller that only needs some
    demo set, like the fine-tuning demo, keeps the one it finds). Writes only where nothing exists
    or into a set it generated (:mod:`engine.generated`); anything else raises :class:`DataError`
    naming ``key``, before anything is written. Returns root."""
    status = demo_dataset_status(root, num_images, size, seed, reuse_any, key)
    if status == "ready":
        return root
    print(demo_notice(root, status, num_images, key), flush=True)

    def write(folder: str) -> None:
        rng = np.random.default_rng(seed)
        n_val = int(num_images * val_fraction)
        for k in range(num_images):
            split = "val" if k < n_val else "train"
            label = k % len(CLASSES)
            img = _dead_leaves(rng, size)
            _foreground(rng, img, label)
            sub = os.path.join(folder, split, CLASSES[label])
            os.makedirs(sub, exist_ok=True)
            img.save(os.path.join(sub, f"{k:05d}.png"))
        with open(os.path.join(folder, _STAMP), "w") as f:     # last: the set is complete
            f.write(_stamp(num_images, size, seed))

    build(root, generator(key), write,
          ready=lambda p: demo_dataset_status(p, num_images, size, seed, reuse_any, key) == "ready")
    return root
