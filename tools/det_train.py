#!/usr/bin/env python
"""Train a detector from configs/detection/ (MMDetection 3.x with the toolkit's plug-in).

    .venv/bin/python tools/det_train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                       [--cfg-options data_root=/data/coco/ pretrained=PATH ...]

``--resume`` continues the latest checkpoint in the work dir (or CKPT) with its optimizer,
scheduler, iteration and log state; checkpoints are read with ``torch.load(weights_only=True)``
(see detection/runner.py). ``--cfg-options data_root=... pretrained=...`` also update every field
derived from them. Multi-GPU / multi-node: tools/det_dist_train.sh.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tools")):
    if path not in sys.path:
        sys.path.insert(0, path)
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")   # mmengine's import

from mmengine.config import Config  # noqa: E402

from detection.cli import (MetricsCapture, add_common_args, build_runner, coco_table,  # noqa: E402
                           ensure_demo_data, load_config)
from make_demo_coco import generate as generate_demo_coco  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config file, e.g. configs/detection/retinanet_vit-b-mae_sfp_1x_coco.py")
    ap.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                    help="resume from CKPT, or without a value from the latest checkpoint in the work dir")
    ap.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper; GPU)")
    add_common_args(ap)
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args)
    if args.amp:
        wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
        if wrapper not in ("OptimWrapper", "AmpOptimWrapper"):
            raise ValueError(f"--amp works with OptimWrapper configs, this one uses {wrapper}")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        if not os.path.isfile(args.resume):
            raise FileNotFoundError(f"--resume checkpoint {args.resume} not found")
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (and validate as the config says); returns the runner and the last metrics."""
    cfg = build_config(args)
    ensure_demo_data(cfg, generate_demo_coco)
    if args.resume == "auto" and not _has_checkpoint(cfg.work_dir):
        print(f"--resume: no checkpoint in {cfg.work_dir} yet; starting from scratch")
    runner = build_runner(cfg)
    capture = MetricsCapture()
    runner.register_hook(capture, priority="LOWEST")
    runner.train()
    return {"runner": runner, "metrics": capture.metrics, "work_dir": cfg.work_dir}


def _has_checkpoint(work_dir: str) -> bool:
    return os.path.isfile(os.path.join(work_dir, "last_checkpoint"))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = result["runner"]
    if runner.rank == 0:
        if result["metrics"]:
            print(f"\nCOCO AP (%) after epoch {runner.epoch}, iteration {runner.iter}:\n{coco_table(result['metrics'])}")
        print(f"work dir: {os.path.abspath(result['work_dir'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
