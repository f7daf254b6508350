"""Helpers of the entry points (tools/det_train.py, tools/det_test.py): user settings given with
``--cfg-options`` reach every field derived from them, the checkpoint files a run will read are
checked before its expensive steps, runners are :class:`DetRunner`, and COCO metrics print as a
table. User errors raise ``engine`` errors (:class:`ConfigError`, :class:`CheckpointError`), which
the entry points' ``engine.errors.run_cli`` turns into exit code 2 and a message."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from engine.config import ConfigError

from .checkpoint_io import KeyReport, check_backbone_checkpoint
from .runner import DetRunner, read_detector_checkpoint
from .swin import check_swin_checkpoint
from .user_settings import USER_VARIABLES, check_model_config, describe, rebind, user_values  # noqa: F401

COCO_COLUMNS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
CONFIG_EXTENSIONS = (".py", ".json", ".yaml", ".yml")   # what mmengine's Config.fromfile reads


def apply_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> List[str]:
    """Merge ``--cfg-options`` into ``cfg``; a changed user variable (``data_root``, ``pretrained``)
    is re-applied to every string derived from its old value (:func:`detection.user_settings.rebind`).
    Fields the options set explicitly keep their value. Returns the paths of the fields it changed."""
    if not options:
        return []
    before = user_values(cfg)
    cfg.merge_from_dict(options)
    explicit = set(options)
    return rebind(cfg, {k: v for k, v in before.items() if k in options},
                  keep=lambda path: any(path == e or path.startswith(e + ".") for e in explicit))


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
    expected = "expected an MMDetection config file (.py), e.g. configs/detection/retinanet_vit-tiny-mae_sfp_demo.py"
    ext = os.path.splitext(args.config)[1]
    if not os.path.isfile(args.config):
        found = "is a folder" if os.path.isdir(args.config) else "does not exist"
        raise ConfigError(f"config {args.config!r} {found}; {expected}")
    if ext not in CONFIG_EXTENSIONS:
        raise ConfigError(f"config {args.config!r} is a {ext or 'extension-less'} file; {expected} "
                          "(the config comes first, then the checkpoint)")
    try:
        cfg = Config.fromfile(args.config)
    except SyntaxError as e:
        raise ConfigError(f"config {args.config!r} is not valid Python: {e.msg} at line {e.lineno} of "
                          f"{e.filename}") from None
    except FileNotFoundError as e:   # a _base_ file
        raise ConfigError(f"config {args.config!r} names a file that does not exist: {e.filename!r} "
                          "(check its _base_ list, relative to the config's folder)") from None
    rebound = apply_cfg_options(cfg, args.cfg_options)
    if rebound:
        print(f"--cfg-options {describe(rebound, limit=len(rebound))}")
    check_model_config(cfg)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    return cfg


def check_pretrained(cfg: Config) -> Optional[KeyReport]:
    """Check the file a ``PlainViT`` / ``TimmSwinTransformer`` backbone's ``init_cfg`` names
    (``pretrained``) against the backbone before a training run builds anything (shapes only,
    cheap: :func:`check_backbone_checkpoint`, :func:`detection.swin.check_swin_checkpoint`);
    ``None`` when the config loads no pretrained backbone of ours."""
    checkers = {"PlainViT": check_backbone_checkpoint, "TimmSwinTransformer": check_swin_checkpoint}
    backbone = cfg.model.get("backbone") or {}
    init_cfg = backbone.get("init_cfg")
    checker = checkers.get(str(backbone.get("type", "")).split(".")[-1])
    if checker is None or not isinstance(init_cfg, dict) \
            or init_cfg.get("type") != "Pretrained" or not isinstance(init_cfg.get("checkpoint"), str):
        return None
    path = init_cfg["checkpoint"]
    what = "pretrained" if path == cfg.get("pretrained") else "model.backbone.init_cfg.checkpoint"
    return checker(backbone, path, what)


def check_detector_checkpoint(cfg: Config, path: str, what: str, resume: bool = False) -> None:
    """Check a detector checkpoint (``load_from``, ``--resume``, det_test.py's CKPT) before a run
    builds anything: readable (its structure only: tensors are memory-mapped), training state for
    a resume, and weights under the config's model parts (backbone, neck, heads). Raises
    :class:`CheckpointError` naming ``what``."""
    parts = [k for k, v in cfg.model.items() if isinstance(v, dict) and "type" in v and k != "data_preprocessor"]
    read_detector_checkpoint(path, what, resume=resume, mmap=True, module_names=parts or None)


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
