"""Estimate a detector's training-step tensor memory without a GPU (how detection/README.md's
figure was made).

    .venv/bin/python -m detection.memory_estimate configs/detection/cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py \
        [--batch 2] [--height H] [--width W] [--objects 20]

The input size defaults to the config's padded square (``SquarePadDataPreprocessor.square_size``:
1024x1024 for the full configs), else 800x1344.

One real training step (forward with the config's activation checkpointing, backward, AdamW
step with its state already allocated) runs on the CPU under ``torch.autocast(bfloat16)``: a
2-byte stand-in for the fp16 of GPU mixed precision, with fp32 parameters, gradients and
optimizer state as AmpOptimWrapper keeps them. torch's ``MemTracker`` records every tensor
allocation, so its peak is the peak of live tensor bytes, as ``torch.cuda.max_memory_allocated``
would count it. It is not a GPU measurement: the CUDA context, cuBLAS / cuDNN workspaces and the
caching allocator's fragmentation come on top, and CPU and CUDA kernels may keep different
temporaries (README: how the margin is added).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._mode_utils import no_dispatch

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks

from .layer_decay import ViTLayerDecayOptimizerConstructor
from .preprocess import square_size_of

GIB = 1024 ** 3


def _batch(n: int, h: int, w: int, objects: int, with_mask: bool, num_classes: int, seed: int = 0):
    """Normalised images [n, 3, h, w] and data samples with random boxes (and box-filling masks)."""
    rng = np.random.RandomState(seed)
    inputs = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))
    samples = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, w * 0.8, objects), rng.uniform(0, h * 0.8, objects)
        bw, bh = rng.uniform(16, w * 0.4, objects), rng.uniform(16, h * 0.4, objects)
        boxes = np.stack([x0, y0, np.minimum(x0 + bw, w - 1), np.minimum(y0 + bh, h - 1)], 1).astype(np.float32)
        labels = torch.from_numpy(rng.randint(0, num_classes, objects))
        inst = InstanceData(bboxes=torch.from_numpy(boxes), labels=labels)
        if with_mask:
            masks = np.zeros((objects, h, w), np.uint8)
            for i, (a, b, c, d) in enumerate(boxes.astype(int)):
                masks[i, b:d, a:c] = 1
            inst.masks = BitmapMasks(masks, h, w)
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                                             ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        sample.gt_instances = inst
        sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        samples.append(sample)
    return inputs, samples


@contextlib.contextmanager
def _mmcv_ops_in_fp32() -> Iterator[None]:
    """mmcv's CPU kernels (nms, RoIAlign) take fp32 only, its CUDA kernels take fp16 too: under
    CPU bf16 autocast their inputs are upcast and results written back, with the temporary copies
    made outside the tracker (``no_dispatch``), so the tensors the model keeps are counted as on a GPU."""
    ext = importlib.import_module("mmcv._ext")
    originals = {name: getattr(ext, name) for name in ("nms", "roi_align_forward", "roi_align_backward")}

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t

    def nms(boxes, scores, **kw):
        with no_dispatch():
            return originals["nms"](up(boxes), up(scores), **kw)

    def roi_align_forward(inp, rois, out, ay, ax, **kw):
        with no_dispatch():
            o = up(out)
            originals["roi_align_forward"](up(inp), up(rois), o, up(ay), up(ax), **kw)
            if o is not out:
                out.copy_(o)

    def roi_align_backward(grad_out, rois, ay, ax, grad_in, **kw):
        with no_dispatch():
            g = up(grad_in)
            originals["roi_align_backward"](up(grad_out), up(rois), up(ay), up(ax), g, **kw)
            if g is not grad_in:
                grad_in.copy_(g)

    for name, fn in (("nms", nms), ("roi_align_forward", roi_align_forward),
                     ("roi_align_backward", roi_align_backward)):
        setattr(ext, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ext, name, fn)


def estimate(config: str, batch: int = 2, height: Optional[int] = None, width: Optional[int] = None,
             objects: int = 20, dtype: torch.dtype = torch.bfloat16, cfg_options: Optional[dict] = None,
             ) -> Dict[str, float]:
    """Peak live tensor memory (GiB, by category) of one training step of ``config``'s model;
    ``height`` / ``width`` default to the config's padded square (else 800 x 1344)."""
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    square = square_size_of(cfg.model)
    height = height or square or 800
    width = width or square or 1344
    init_default_scope(cfg.get("default_scope", "mmdet"))
    cfg.model.backbone.init_cfg = None          # random weights: memory does not depend on them
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    ow = dict(cfg.optim_wrapper)
    ctor = ViTLayerDecayOptimizerConstructor(dict(type="OptimWrapper", optimizer=ow["optimizer"]),
                                             ow.get("paramwise_cfg"))
    optimizer = ctor(model).optimizer
    for p in model.parameters():                # allocate AdamW's state (as after the first step)
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with_mask = "mask_head" in cfg.model.get("roi_head", {})
    head = cfg.model.get("bbox_head") or cfg.model.roi_head.bbox_head
    num_classes = (head[0] if isinstance(head, list) else head)["num_classes"]
    inputs, samples = _batch(batch, height, width, objects, with_mask, num_classes)

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    t0 = time.time()
    with tracker, _mmcv_ops_in_fp32():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            losses = model(inputs, samples, mode="loss")   # through __call__: one root module
        loss, _ = model.parse_losses(losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    snap = next(iter(peak.values()))
    out = {str(getattr(k, "value", k)): v / GIB for k, v in snap.items()}
    out["seconds"] = time.time() - t0
    out["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    out["height"], out["width"] = height, width
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--batch", type=int, default=2, help="images per GPU (default 2)")
    ap.add_argument("--height", type=int, default=None,
                    help="padded input height (default: the config's square_size, else 800)")
    ap.add_argument("--width", type=int, default=None,
                    help="padded input width (default: the config's square_size, else 1344: 1333 padded to 32)")
    ap.add_argument("--objects", type=int, default=20, help="ground-truth objects per image (default 20)")
    ap.add_argument("--fp32", action="store_true", help="no autocast (full precision training)")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE",
                    help="config overrides, e.g. model.backbone.with_cp=False")
    args = ap.parse_args(argv)
    res = estimate(args.config, args.batch, args.height, args.width, args.objects,
                   torch.float32 if args.fp32 else torch.bfloat16, args.cfg_options)
    setting = f"{' ' + str(args.cfg_options) if args.cfg_options else ''} ({'fp32' if args.fp32 else 'bf16 autocast'})"
    height, width = res.pop("height"), res.pop("width")
    print(f"{args.config}{setting}: {args.batch} x {height}x{width}, {args.objects} objects/image, "
          f"{res.pop('params_M'):.1f}M parameters, one CPU step in {res.pop('seconds'):.0f} s")
    print("peak live tensor memory (GiB) by category at the peak:")
    for k, v in res.items():
        print(f"  {k:>12}: {v:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
