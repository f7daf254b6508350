"""Helpers of the entry points (tools/det_train.py, tools/det_test.py): user settings given with
``--cfg-options`` reach every field derived from them, runners are :class:`DetRunner`, and COCO
metrics print as a table."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .runner import DetRunner

# Top-level config variables a user sets; configs derive other fields from them
# (dataset data_root, evaluator ann_file, backbone init_cfg checkpoint).
USER_VARIABLES = ("data_root", "pretrained")
COCO_COLUMNS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def _string_slots(node: Any, path: str) -> Iterator[Tuple[Any, Any, str]]:
    """(container, key, dotted path) of every string inside nested dicts and lists."""
    if isinstance(node, dict):
        items: Iterable = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        sub = f"{path}[{key}]" if isinstance(node, list) else (f"{path}.{key}" if path else str(key))
        if isinstance(value, str):
            yield node, key, sub
        else:
            yield from _string_slots(value, sub)


def apply_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> List[str]:
    """Merge ``--cfg-options`` into ``cfg``; a changed user variable (``data_root``, ``pretrained``)
    is re-applied to every string derived from its old value: equal to it, or, for a folder
    (ending in '/'), starting with it. Fields the options set explicitly keep their value.
    Returns the paths of the fields it changed."""
    if not options:
        return []
    before = {k: cfg[k] for k in USER_VARIABLES if isinstance(cfg.get(k), str)}
    cfg.merge_from_dict(options)
    explicit = set(options)
    changed: List[str] = []
    for key, old in before.items():
        if key not in options or cfg[key] == old:
            continue
        new = cfg[key]
        if not isinstance(new, str):
            raise ValueError(f"--cfg-options {key} must be a path string, got {new!r}")
        if old.endswith("/") and not new.endswith("/"):
            new += "/"
            cfg[key] = new
        for container, k, path in _string_slots(cfg._cfg_dict, ""):
            if path in USER_VARIABLES or any(path == e or path.startswith(e + ".") for e in explicit):
                continue
            value = container[k]
            if value == old or (old.endswith("/") and value.startswith(old)):
                container[k] = new + value[len(old):]
                changed.append(path)
    return changed


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options both entry points take: --work-dir, --cfg-options, --launcher (and torch's --local-rank)."""
    ap.add_argument("--work-dir", help="where logs and checkpoints go (default work_dirs/<config name>)")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE",
                    help="override config keys, e.g. data_root=/data/coco/ train_cfg.max_epochs=1")
    ap.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                    help="job launcher (tools/det_dist_train.sh passes 'pytorch')")
    ap.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace) -> Config:
    """``args.config`` with ``--cfg-options`` applied (see :func:`apply_cfg_options`), the launcher
    and the work dir (``--work-dir``, the config's, or ``work_dirs/<config name>``) set."""
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config {args.config} not found")
    cfg = Config.fromfile(args.config)
    rebound = apply_cfg_options(cfg, args.cfg_options)
    if rebound:
        print(f"--cfg-options re-applied to: {', '.join(rebound)}")
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The config's ``runner_type`` (registered name) or :class:`DetRunner`."""
    if "runner_type" in cfg:
        return RUNNERS.build(cfg)
    return DetRunner.from_cfg(cfg)


def ensure_demo_data(cfg: Config, generate: Callable[[str], str]) -> Optional[str]:
    """Generate the synthetic demo set at ``cfg.data_root`` when a demo config (``demo_coco =
    True``) finds it missing; ``generate(path)`` is tools/make_demo_coco.generate."""
    if not cfg.get("demo_coco"):
        return None
    root = cfg.data_root
    if not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
        print(f"generating the demo COCO set in {root} ...")
        generate(root)
    return root


class MetricsCapture(Hook):
    """Keeps the metrics of the last validation / test (for the entry points' summary table)."""
    priority = "LOWEST"

    def __init__(self) -> None:
        self.metrics: Dict[str, float] = {}

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        self.metrics = dict(metrics or {})

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        self.metrics = dict(metrics or {})


def coco_table(metrics: Mapping[str, float]) -> str:
    """CocoMetric results (``coco/bbox_mAP`` ...) as a table: one row per IoU type, AP in percent."""
    rows: List[Tuple[str, List[str]]] = []
    for iou_type in ("bbox", "segm"):
        vals = [metrics.get(f"coco/{iou_type}_{c}") for c in COCO_COLUMNS]
        if any(v is not None for v in vals):
            # pycocotools reports -1 for an area range without ground truth
            rows.append((iou_type, ["-" if v is None or float(v) < 0 else f"{100 * float(v):.1f}" for v in vals]))
    if not rows:
        return "no COCO metrics (no detections were made, or the evaluator is not CocoMetric)"
    header = ["", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = ["  ".join(f"{h:>6}" for h in header)]
    lines += ["  ".join(f"{c:>6}" for c in [name, *vals]) for name, vals in rows]
    return "\n".join(lines)
