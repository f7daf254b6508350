#!/usr/bin/env python
"""Generate the tiny COCO-format detection set of the detection demos (deterministic).

    .venv/bin/python tools/make_demo_coco.py [OUT]   # default data/demo_coco; no-op if it exists
    .venv/bin/python tools/make_demo_coco.py OUT --force

OUT must not exist, or be a set this tool generated (it holds the marker file
``.efficienttrain-generated``, see engine/generated.py): any other path, an empty folder included,
is refused with exit code 2, and --force regenerates only a set of ours holding nothing but its files.

Layout as COCO 2017 (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``),
so a demo config points at real COCO by changing ``data_root`` only. Images are 48-64 px JPEGs
with 1-3 filled squares, discs and triangles that do not overlap (so every mask is the visible
object), each about 100 levels away from the background in every channel, so a detector learns
them within minutes on a CPU (polygon masks, boxes from the polygons; category ids 1, 3, 5: not
contiguous, as COCO's). Like real COCO the set also has grayscale JPEGs, crowd
annotations (``iscrowd=1``) with uncompressed RLE masks, and images without annotations. Each
shape is painted from its mask as pycocotools rasterizes the polygon (as mmdet's training and COCO's
evaluation decode it), and its box is that mask's extent: annotations match the pixels exactly.
numpy, Pillow and pycocotools (mmdet's dependency): the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.errors import run_cli  # noqa: E402
from engine.generated import Generated, build, check_removable, check_target, is_default  # noqa: E402

CATEGORIES = [{"id": 1, "name": "square", "supercategory": "shape"},
              {"id": 3, "name": "disc", "supercategory": "shape"},
              {"id": 5, "name": "triangle", "supercategory": "shape"}]
CLASSES = tuple(c["name"] for c in CATEGORIES)
SIZES = ((64, 48), (48, 64), (56, 56), (64, 64))   # (width, height)
SPLITS = {"train": 600, "val": 48}
VERSION = "2.0"   # bump when the images change: an older set on disk is then regenerated
DESCRIPTION = "EfficientTrain toolkit synthetic demo set (COCO format)"
DEFAULT_OUT = "data/demo_coco"   # the detection demo configs' data_root


def rle_uncompressed(mask: np.ndarray) -> Dict:
    """COCO's uncompressed RLE of a binary [H, W] mask: run lengths in column-major order,
    starting with a (possibly empty) run of zeros, as real COCO stores crowd masks."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _shape_polygon(rng: np.random.RandomState, kind: str, cx: float, cy: float, r: float) -> List[float]:
    if kind == "square":
        angles = rng.uniform(0, math.pi / 2) + np.arange(4) * math.pi / 2
    elif kind == "disc":
        angles = np.arange(16) * 2 * math.pi / 16
    else:
        angles = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3
    pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    return [round(float(v), 2) for p in pts for v in p]


def _polygon_mask(poly: Sequence[float], w: int, h: int) -> np.ndarray:
    """The polygon's [h, w] uint8 mask as pycocotools (so mmdet and the COCO evaluator) decode it."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([list(poly)], h, w)))


def _paint(img: Image.Image, mask: np.ndarray, color: Tuple[int, ...]) -> None:
    img.paste(color, mask=Image.fromarray(mask * 255))


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _make_image(rng: np.random.RandomState, w: int, h: int, n_shapes: int, crowd: bool,
                ) -> Tuple[Image.Image, List[Dict]]:
    """One RGB image and its annotations (without ids)."""
    bg = rng.randint(0, 256, 3)
    arr = np.clip(bg[None, None, :] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    anns = []
    if crowd:   # a cluster of small discs annotated as one crowd region (RLE), as COCO's crowds; drawn
                # first, so the objects drawn over it keep their annotations exact
        mask = np.zeros((h, w), np.uint8)
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        color = tuple(int(c) for c in rng.randint(0, 256, 3))
        for _ in range(6):
            cx, cy, r = x0 + rng.uniform(0, w / 3), y0 + rng.uniform(0, h / 3), rng.uniform(2, 4)
            poly = _shape_polygon(rng, "disc", cx, cy, r)
            mask |= _polygon_mask(poly, w, h)
        _paint(img, mask, color)
        anns.append({"category_id": CATEGORIES[1]["id"], "segmentation": rle_uncompressed(mask),
                     "area": float(mask.sum()), "bbox": _bbox(mask), "iscrowd": 1})
    placed: List[Tuple[float, float, float]] = []
    for _ in range(n_shapes):
        cat = CATEGORIES[rng.randint(len(CATEGORIES))]
        for _try in range(20):                  # a spot clear of the shapes already drawn
            r = rng.uniform(8, 0.3 * min(w, h))
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        poly = _shape_polygon(rng, cat["name"], cx, cy, r)
        color = tuple(int(c) for c in (bg + 96 + rng.randint(0, 65, 3)) % 256)   # 96-160 levels from bg
        mask = _polygon_mask(poly, w, h)
        if mask.sum() == 0:
            continue
        _paint(img, mask, color)
        anns.append({"category_id": cat["id"], "segmentation": [poly], "area": float(mask.sum()),
                     "bbox": _bbox(mask), "iscrowd": 0})
    return img, anns


def _split(out: str, split: str, n: int, seed: int) -> Dict:
    rng = np.random.RandomState(seed)
    folder = os.path.join(out, f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image_id = 1000 * (1 if split == "train" else 2) + i
        w, h = SIZES[rng.randint(len(SIZES))]
        empty = i % 8 == 7                      # images without annotations
        crowd = i % 8 == 2                      # a crowd region (RLE mask) next to normal objects
        img, anns = _make_image(rng, w, h, 0 if empty else rng.randint(1, 4), crowd and not empty)
        if i % 10 == 3:                         # grayscale JPEGs, as some COCO images
            img = img.convert("L")
        name = f"{image_id:012d}.jpg"
        img.save(os.path.join(folder, name), quality=92)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1 + 100000 * (split == "val"), "image_id": image_id, **a})
    return {"info": {"description": DESCRIPTION, "version": VERSION,
                     "seed": seed},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}


def annotation_file(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}2017.json")


_FILE = re.compile(r"(train|val)2017/\d{12}\.jpg|annotations/instances_(train|val)2017\.json")
_SPECS = {   # how the folder is named, what asked for the set and what a user can do instead
    "OUT": ("tools/make_demo_coco.py", "choose an OUT folder that does not exist yet (--force regenerates only a "
                                       "set this tool generated)"),
    "data_root": ("the demo config (demo_coco = True)",
                  "point data_root at a folder that does not exist yet for the demo set (or leave the default "
                  f"{DEFAULT_OUT}/), or train on your own COCO-format data with a config without demo_coco, e.g. "
                  "configs/detection/retinanet_vit-b-mae_sfp_1x_coco.py"),
}


def _read_info(root: str) -> Optional[Dict]:
    """The ``info`` of the set's training annotations when both annotation files are there."""
    if not all(os.path.isfile(annotation_file(root, s)) for s in SPLITS):
        return None
    try:
        with open(annotation_file(root, "train")) as f:
            info = json.load(f).get("info")
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def _legacy(root: str) -> bool:
    """A set written before the marker existed (its annotations say so; :mod:`engine.generated`
    also requires that it holds only this generator's files)."""
    return (_read_info(root) or {}).get("description") == DESCRIPTION


def generator(key: str = "OUT") -> Generated:
    """This generator as the setting ``key`` names its folder (``OUT`` here, ``data_root`` in the
    detection demo configs)."""
    by, advice = _SPECS.get(key, _SPECS["OUT"])
    return Generated(what="demo COCO set", key=key, by=by, advice=advice,
                     owns=lambda rel: _FILE.fullmatch(rel) is not None, legacy=_legacy)


def status(out: str, seed: int = 0, key: str = "OUT") -> str:
    """What :func:`generate` would do at ``out`` without ``--force``, without writing: ``"ready"``
    (it keeps the set there), ``"missing"`` or ``"regenerate"`` (an older set of ours); raises
    :class:`DataError` where it would refuse (a path it did not generate, or a set of ours holding
    a user's file), so a dry run's verdict is the real run's."""
    gen = generator(key)
    if check_target(out, gen) == "missing":
        return "missing"
    info = _read_info(out) or {}
    if (info.get("version"), info.get("seed")) == (VERSION, seed):
        return "ready"
    check_removable(out, gen)
    return "regenerate"


def notice(out: str, verdict: str, key: str = "OUT", dry_run: bool = False) -> str:
    """The line said before the set is written (or, in a dry run, that it would be): the absolute
    path and that the set is synthetic; louder when a demo config's ``data_root`` is not its own
    default (a user's path: the pictures are not their data)."""
    verb = {"missing": "generate", "regenerate": "regenerate"}[verdict]
    why = "; the set there is of an older version or seed" if verdict == "regenerate" else ""
    line = (f"dry run: the real run would {verb}" if dry_run else f"{verb[:-1]}ing") + \
        f" the synthetic demo COCO set in {os.path.abspath(out)} ({sum(SPLITS.values())} images{why})"
    if key == "data_root" and not is_default(out, DEFAULT_OUT):
        line += (f": data_root is not the demo configs' own {DEFAULT_OUT}/, and demo_coco = True writes synthetic "
                 "images and annotations there, not your data (for your own COCO data use a config without "
                 "demo_coco)")
    return line + ("" if dry_run else " ...")


def generate(out: str, seed: int = 0, force: bool = False, key: str = "OUT") -> str:
    """Write the set to ``out``; if it is already complete, made by this version with this seed and
    ``force`` is false, leave it as is. Writes only where nothing exists or into a set it generated
    (atomically: a marked temporary folder next to ``out``, moved into place at the end); any other
    path, with ``force`` too, raises :class:`DataError` naming ``key`` before anything is written."""
    out = os.path.abspath(out)
    verdict = status(out, seed, key)
    if verdict == "ready":
        if not force:
            return out
        check_removable(out, generator(key))
        verdict = "regenerate"
    print(notice(out, verdict, key), flush=True)

    def write(folder: str) -> None:
        os.makedirs(os.path.join(folder, "annotations"))
        for k, (split, n) in enumerate(SPLITS.items()):
            data = _split(folder, split, n, seed + k)
            with open(annotation_file(folder, split), "w") as f:
                json.dump(data, f)

    return build(out, generator(key), write, ready=lambda p: not force and status(p, seed, key) == "ready")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}); it must not "
                    "exist, or be a set this tool generated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if the set exists (only a set this tool "
                    "generated: any other folder is refused)")
    args = ap.parse_args(argv)

    def run() -> None:
        path = generate(args.out, args.seed, args.force)
        for split in SPLITS:
            with open(annotation_file(path, split)) as f:
                d = json.load(f)
            print(f"{split}: {len(d['images'])} images, {len(d['annotations'])} annotations -> "
                  f"{annotation_file(path, split)}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
