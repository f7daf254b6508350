"""A picture of a detector's predictions on a few test images (boxes, masks, class names, scores).

Why our own few lines instead of mmdet's ``DetVisualizationHook``: that hook writes one file per
image at its original size (the demo's 48-64 px images would carry unreadable labels); here the
first images of the test set are enlarged and tiled into one PNG beside the AP table.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from mmengine.hooks import Hook
from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))


class PredictionCollector(Hook):
    """Keeps the predictions of the first ``num`` test images (as numpy, in image coordinates)."""

    priority = "LOWEST"

    def __init__(self, num: int = 8) -> None:
        self.num = num
        self.samples: List[Dict[str, Any]] = []

    def after_test_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Optional[Sequence] = None) -> None:
        for out in outputs or []:
            if len(self.samples) >= self.num:
                return
            pred = out.pred_instances
            masks = getattr(pred, "masks", None)
            self.samples.append({
                "img_path": out.img_path, "bboxes": pred.bboxes.cpu().numpy(), "labels": pred.labels.cpu().numpy(),
                "scores": pred.scores.cpu().numpy(),
                "masks": masks.cpu().numpy().astype(bool) if masks is not None and len(masks) else None})


def draw_predictions(samples: Sequence[Dict[str, Any]], classes: Sequence[str], path: str,
                     score_thr: float = 0.3, scale: int = 4, columns: int = 4) -> str:
    """Tile ``samples`` (PredictionCollector's) into one PNG at ``path``: each image enlarged
    ``scale`` times, predictions scoring at least ``score_thr`` drawn as mask tint, box and
    "class score" label. Returns ``path``."""
    if not samples:
        raise ValueError("no predictions to draw")
    tiles = []
    for s in samples:
        img = Image.open(s["img_path"]).convert("RGB")
        w, h = img.size
        arr = np.asarray(img.resize((w * scale, h * scale), Image.NEAREST)).astype(np.float32)
        keep = [i for i, sc in enumerate(s["scores"]) if sc >= score_thr]
        for i in keep:
            color = np.array(PALETTE[int(s["labels"][i]) % len(PALETTE)], np.float32)
            if s["masks"] is not None:
                m = np.kron(s["masks"][i][:h, :w], np.ones((scale, scale), bool))
                arr[m] = 0.5 * arr[m] + 0.5 * color
        tile = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(tile)
        for i in keep:
            color = PALETTE[int(s["labels"][i]) % len(PALETTE)]
            x0, y0, x1, y1 = (float(v) * scale for v in s["bboxes"][i])
            draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
            label = f"{classes[int(s['labels'][i])]} {s['scores'][i]:.2f}"
            tx, ty = x0 + 2, max(y0 - 12, 0)
            draw.rectangle([tx - 1, ty, tx + 6 * len(label) + 1, ty + 11], fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color)
        tiles.append(tile)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cw + 4) + 4, rows * (ch + 4) + 4), (255, 255, 255))
    for k, t in enumerate(tiles):
        sheet.paste(t, (4 + (k % cols) * (cw + 4), 4 + (k // cols) * (ch + 4)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path
