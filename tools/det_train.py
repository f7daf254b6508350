#!/usr/bin/env python
"""Train a detector from configs/detection/ (MMDetection 3.x with the toolkit's plug-in).

    .venv/bin/python tools/det_train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp | --no-amp] [--dry-run]
                                       [--cfg-options data_root=/data/coco/ pretrained=PATH ...]

``--resume`` continues the latest checkpoint in the work dir (or CKPT) with its optimizer,
scheduler, iteration and log state; checkpoints are read with ``torch.load(weights_only=True)``
(see detection/runner.py). ``--cfg-options data_root=... pretrained=...`` also update every field
derived from them; ``pretrained=None`` trains from random weights; ``image_size=128`` makes every
input size (resize, crop, padded square, the ViT's tables) a 128-px square, e.g. for a smoke run.
Mixed precision follows the device unless told (``amp``, detection/amp.py): a config's
AmpOptimWrapper trains in fp32 on a machine without CUDA, with a logged notice; ``--amp`` insists
on it (CUDA), ``--no-amp`` always trains in fp32. A CPU smoke run of any full config:

    .venv/bin/python tools/det_train.py CONFIG --work-dir /tmp/smoke --cfg-options data_root=DIR/ \
        pretrained=None image_size=128 train_dataloader.batch_size=1 train_cfg.max_iters=2 \
        val_cfg=None val_dataloader=None val_evaluator=None default_hooks.checkpoint=None

(epoch-based 1x configs: ``train_cfg.max_epochs=1 train_dataloader.dataset.indices=2`` in place
of ``max_iters``). Multi-GPU / multi-node: tools/det_dist_train.sh.

The data (annotation files and image folders; for a demo config, ``demo_coco = True``, the verdict
of the demo generator, which writes only into a missing folder or one it generated) and the
checkpoint files the run will read (``pretrained``, ``--resume``, ``load_from``) are checked
before anything is written or built; ``--dry-run`` stops there. A user error (a missing or unusable
file, folder or config, a checkpoint that does not fit the config's backbone) ends with exit code 2
and one message, ``error: ...``.
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
from mmengine.runner import find_latest_checkpoint  # noqa: E402

from detection.cli import (MetricsCapture, add_common_args, build_runner, check_data,  # noqa: E402
                           check_detector_checkpoint, check_pretrained, coco_table, ensure_demo_data, load_config)
from detection.amp import resolve_amp  # noqa: E402
from detection.runner import DetRunner  # noqa: E402
from engine.errors import run_cli  # noqa: E402
from engine.stops import RunLock  # noqa: E402
import make_demo_coco  # noqa: E402  (tools/)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config file, e.g. configs/detection/retinanet_vit-b-mae_sfp_1x_coco.py")
    ap.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                    help="resume from CKPT, or without a value from the latest checkpoint in the work dir")
    amp = ap.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_const", const=True, default=None,
                     help="mixed precision (AmpOptimWrapper) even for an fp32 config; needs CUDA")
    amp.add_argument("--no-amp", dest="amp", action="store_const", const=False,
                     help="fp32 (OptimWrapper) even for an AMP config. Default: the config's `amp` ('auto': "
                          "an AmpOptimWrapper config trains in fp32 on a machine without CUDA, with a notice)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config, the checkpoints and the data as the run would, print the verdict and "
                         "exit without building the runner or writing anything (a demo set is not generated)")
    add_common_args(ap)
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config with the options applied; ``cfg.amp_notice`` holds the AMP notice to log (or None)."""
    cfg = load_config(args)
    if args.amp is not None:
        cfg.amp = args.amp
    cfg.amp_notice = resolve_amp(cfg)   # before anything is built: --amp without CUDA is refused here
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def data_loaders(cfg: Config) -> List[str]:
    """The dataloaders a training run builds: training, and validation when the config has it."""
    return ["train_dataloader"] + (["val_dataloader"] if cfg.get("val_cfg") and cfg.get("val_dataloader") else [])


def check_checkpoints(cfg: Config, args: argparse.Namespace, said: Optional[List[str]] = None) -> str:
    """Check every checkpoint file the run will read before it builds anything (cheap: shapes and
    structure only); returns how the loaded detector checkpoint is named in errors. ``said``
    collects a line per checked file (what a dry run prints)."""
    said = [] if said is None else said
    if check_pretrained(cfg) is not None:   # init_weights loads it in every training run, a resumed one too
        said.append(f"pretrained {cfg.model.backbone.init_cfg.checkpoint}: fits the backbone")
    label = "load_from"
    if args.resume == "auto":
        latest = find_latest_checkpoint(cfg.work_dir) if _has_checkpoint(cfg.work_dir) else None
        label = f"--resume (the latest checkpoint in {cfg.work_dir})"
        if latest is not None:
            check_detector_checkpoint(cfg, latest, label, resume=True)
            said.append(f"{label}: {latest} (resumable)")
        else:
            said.append(f"--resume: no checkpoint in {cfg.work_dir} yet; the run would start from scratch")
    elif args.resume is not None:
        label = "--resume"
        check_detector_checkpoint(cfg, args.resume, label, resume=True)
        said.append(f"--resume {args.resume}: resumable")
    elif cfg.get("load_from"):
        check_detector_checkpoint(cfg, cfg.load_from, label)
        said.append(f"load_from {cfg.load_from}: fits the detector")
    return label


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (and validate as the config says); returns the runner and the last metrics. The data
    (a demo set's verdict: a user's folder is refused) and the checkpoints are checked before
    anything is written or built; ``--dry-run`` stops there and prints what it checked."""
    cfg = build_config(args)
    said = check_data(cfg, data_loaders(cfg), make_demo_coco.status, make_demo_coco.notice)
    label = check_checkpoints(cfg, args, said)
    amp_notice = cfg.pop("amp_notice", None)
    if args.dry_run:
        wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
        said.append(amp_notice or f"optimizer wrapper: {wrapper} (amp={cfg.amp!r})")
        print("\n".join([*said, f"work dir: {os.path.abspath(cfg.work_dir)}",
                         "dry run: the config, checkpoints and data check out; nothing was built or written"]))
        return {"dry_run": True, "work_dir": cfg.work_dir}
    # one live run per work dir (the first process of a multi-GPU job holds it)
    lock = RunLock(cfg.work_dir, " ".join(sys.argv)).acquire() if os.environ.get("RANK", "0") == "0" else None
    try:
        if lock is not None and lock.notice:
            print(lock.notice)
        ensure_demo_data(cfg, make_demo_coco.generate)
        if args.resume == "auto" and not _has_checkpoint(cfg.work_dir):
            print(f"--resume: no checkpoint in {cfg.work_dir} yet; starting from scratch")
        runner = build_runner(cfg)
        if isinstance(runner, DetRunner):
            runner.checkpoint_label = label
        if amp_notice:
            runner.logger.warning(amp_notice)
        capture = MetricsCapture()
        runner.register_hook(capture, priority="LOWEST")
        runner.train()
    finally:
        if lock is not None:
            lock.release()
    return {"runner": runner, "metrics": capture.metrics, "work_dir": cfg.work_dir}


def _has_checkpoint(work_dir: str) -> bool:
    return os.path.isfile(os.path.join(work_dir, "last_checkpoint"))


def main(argv: Optional[List[str]] = None) -> int:
    """Exit code 0, or 2 with ``error: ...`` on stderr for a user error (engine.errors.run_cli)."""
    args = parse_args(argv)
    return run_cli(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    result = run(args)
    if result.get("dry_run"):
        return 0
    runner = result["runner"]
    if runner.rank == 0:
        if result["metrics"]:
            print(f"\nCOCO AP (%) after epoch {runner.epoch}, iteration {runner.iter}:\n{coco_table(result['metrics'])}")
        print(f"work dir: {os.path.abspath(result['work_dir'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
