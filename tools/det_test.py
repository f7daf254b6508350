#!/usr/bin/env python
"""Evaluate a trained detector on the config's test set: COCO box (and mask) AP by pycocotools.

    .venv/bin/python tools/det_test.py CONFIG CKPT [--work-dir DIR] [--dry-run] [--cfg-options data_root=... ...]

CKPT is a checkpoint written by tools/det_train.py (read with ``torch.load(weights_only=True)``,
see detection/runner.py). Prints pycocotools' summary and an AP table (bbox, and segm for
Mask R-CNN configs); multi-GPU: ``torchrun --nproc_per_node N tools/det_test.py ... --launcher pytorch``.
The test data (for a demo config, ``demo_coco = True``, the verdict of the demo generator, which
writes only into a missing folder or one it generated) and CKPT are checked before anything is
written or built; ``--dry-run`` stops there. A user error (a missing or unusable config, data
folder or checkpoint) ends with exit code 2 and one message, ``error: ...``.
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

from detection.cli import (MetricsCapture, add_common_args, build_runner, check_data,  # noqa: E402
                           check_detector_checkpoint, coco_table, ensure_demo_data, load_config)
from detection.runner import DetRunner  # noqa: E402
from detection.visualize import PredictionCollector, draw_predictions  # noqa: E402
from engine.errors import run_cli  # noqa: E402
import make_demo_coco  # noqa: E402  (tools/)

CKPT_LABEL = "checkpoint"   # how errors name the CKPT argument


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config file the detector was trained with")
    ap.add_argument("checkpoint", help="checkpoint from tools/det_train.py (e.g. WORK_DIR/epoch_12.pth)")
    ap.add_argument("--picture", type=int, default=8, metavar="N",
                    help="draw the predictions (score >= 0.3) on the first N test images into "
                         "WORK_DIR/predictions.png (default 8; 0: no picture)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config, the checkpoint and the test data as the run would, print the verdict "
                         "and exit without building the runner or writing anything (a demo set is not generated)")
    add_common_args(ap)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate ``args.checkpoint``; returns the metrics (``coco/bbox_mAP``, ...). The test data (a
    demo set's verdict: a user's folder is refused) and the checkpoint are checked before anything
    is written or built; ``--dry-run`` stops there and prints what it checked."""
    cfg = load_config(args, load_from=args.checkpoint)   # (a backbone geometry left to the files may come from it)
    said = check_data(cfg, ["test_dataloader"], make_demo_coco.status, make_demo_coco.notice)
    check_detector_checkpoint(cfg, args.checkpoint, CKPT_LABEL)   # before the test set is built
    if args.dry_run:
        print("\n".join([*said, f"{CKPT_LABEL} {args.checkpoint}: fits the detector",
                         f"work dir: {os.path.abspath(cfg.work_dir)}",
                         "dry run: the config, checkpoint and data check out; nothing was built or written"]))
        return {"dry_run": True}
    cfg.load_from, cfg.resume = args.checkpoint, False
    ensure_demo_data(cfg, make_demo_coco.generate)
    runner = build_runner(cfg)
    if isinstance(runner, DetRunner):
        runner.checkpoint_label = CKPT_LABEL
    capture = MetricsCapture()
    runner.register_hook(capture, priority="LOWEST")
    collector = PredictionCollector(args.picture)
    if args.picture > 0:
        runner.register_hook(collector, priority="LOWEST")
    metrics = runner.test()
    picture = None
    if args.picture > 0 and runner.rank == 0 and collector.samples:
        classes = runner.test_dataloader.dataset.metainfo["classes"]
        picture = draw_predictions(collector.samples, classes, os.path.join(cfg.work_dir, "predictions.png"))
    return {"runner": runner, "metrics": dict(metrics or capture.metrics), "picture": picture}


def main(argv: Optional[List[str]] = None) -> int:
    """Exit code 0, or 2 with ``error: ...`` on stderr for a user error (engine.errors.run_cli)."""
    args = parse_args(argv)
    return run_cli(lambda: _test(args))


def _test(args: argparse.Namespace) -> int:
    result = run(args)
    if result.get("dry_run"):
        return 0
    if result["runner"].rank == 0:
        print(f"\nCOCO AP (%) of {args.checkpoint}:\n{coco_table(result['metrics'])}")
        if result["picture"]:
            print(f"predictions on the first {args.picture} test images: {result['picture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
