#!/usr/bin/env python
"""Generate the tiny COCO-format detection set of the detection demos (deterministic).

    .venv/bin/python tools/make_demo_coco.py [OUT]   # default data/demo_coco; no-op if it exists
    .venv/bin/python tools/make_demo_coco.py OUT --force

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
import shutil
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 1, "name": "square", "supercategory": "shape"},
              {"id": 3, "name": "disc", "supercategory": "shape"},
              {"id": 5, "name": "triangle", "supercategory": "shape"}]
CLASSES = tuple(c["name"] for c in CATEGORIES)
SIZES = ((64, 48), (48, 64), (56, 56), (64, 64))   # (width, height)
SPLITS = {"train": 600, "val": 48}
VERSION = "2.0"   # bump when the images change: an older set on disk is then regenerated


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
    return {"info": {"description": "EfficientTrain toolkit synthetic demo set (COCO format)", "version": VERSION,
                     "seed": seed},
            "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}


def annotation_file(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}2017.json")


def generate(out: str, seed: int = 0, force: bool = False) -> str:
    """Write the set to ``out`` (atomically: a temporary folder renamed at the end); if it is
    already complete, made by this version with this seed and ``force`` is false, leave it as is."""
    out = os.path.abspath(out)
    if not force and all(os.path.isfile(annotation_file(out, s)) for s in SPLITS):
        with open(annotation_file(out, "train")) as f:
            info = json.load(f).get("info", {})
        if (info.get("version"), info.get("seed")) == (VERSION, seed):
            return out
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "annotations"))
    for k, (split, n) in enumerate(SPLITS.items()):
        data = _split(tmp, split, n, seed + k)
        with open(annotation_file(tmp, split), "w") as f:
            json.dump(data, f)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="data/demo_coco", help="output folder (default data/demo_coco)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if the set exists")
    args = ap.parse_args(argv)
    path = generate(args.out, args.seed, args.force)
    for split in SPLITS:
        with open(annotation_file(path, split)) as f:
            d = json.load(f)
        print(f"{split}: {len(d['images'])} images, {len(d['annotations'])} annotations -> {annotation_file(path, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
