"""Helpers of the entry points (tools/det_train.py, tools/det_test.py): user settings given with
``--cfg-options`` reach every field derived from them, the checkpoint files a run will read are
checked before its expensive steps, runners are :class:`DetRunner`, and COCO metrics print as a
table. User errors raise ``engine`` errors (:class:`ConfigError`, :class:`CheckpointError`), which
the entry points' ``engine.errors.run_cli`` turns into exit code 2 and a message."""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from engine.config import ConfigError
from engine.data import DataError

from .checkpoint_io import KeyReport
from .custom import resolve_derived
from .runner import DetRunner, read_detector_checkpoint
from .swin import check_swin_checkpoint
from .vit import check_backbone_checkpoint
from .user_settings import (USER_VARIABLES, apply_image_size, check_model_config, describe,  # noqa: F401
                            leaf_datasets, parse_config_file, rebind, user_values)

COCO_COLUMNS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
CONFIG_EXTENSIONS = (".py", ".json", ".yaml", ".yml")   # what mmengine's Config.fromfile reads


def apply_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> List[str]:
    """Merge ``--cfg-options`` into ``cfg``; a changed user variable (``data_root``, ``pretrained``)
    is re-applied to every string derived from its old value (:func:`detection.user_settings.rebind`;
    ``pretrained=None``: random initialisation), ``image_size`` to every input size
    (:func:`detection.user_settings.apply_image_size`, which wins over explicit size keys). Fields the
    options set explicitly keep their value otherwise. Returns the paths of the fields it changed."""
    if not options:
        return []
    before = user_values(cfg)
    cfg.merge_from_dict(options)
    explicit = set(options)
    keep = lambda path: any(path == e or path.startswith(e + ".") for e in explicit)  # noqa: E731
    changed = rebind(cfg, {k: v for k, v in before.items() if k in options}, keep=keep)
    if "image_size" in options:
        changed += apply_image_size(cfg, cfg.image_size)
    return changed


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options both entry points take: --work-dir, --cfg-options, --launcher (and torch's --local-rank)."""
    ap.add_argument("--work-dir", help="where logs and checkpoints go (default work_dirs/<config name>)")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE",
                    help="override config keys, e.g. data_root=/data/coco/ train_cfg.max_epochs=1")
    ap.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                    help="job launcher (tools/det_dist_train.sh passes 'pytorch')")
    ap.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace, load_from: Optional[str] = None) -> Config:
    """``args.config`` with ``--cfg-options`` applied (see :func:`apply_cfg_options`), what the
    config leaves to its files derived (:func:`detection.custom.resolve_derived`: the encoder's
    geometry from ``pretrained``, or from ``load_from`` when given and ``pretrained`` is absent;
    ``classes = None`` from the annotation file), the launcher and the work dir (``--work-dir``,
    the config's, or ``work_dirs/<config name>``) set."""
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
        cfg = parse_config_file(args.config)
    except SyntaxError as e:
        raise ConfigError(f"config {args.config!r} is not valid Python: {e.msg} at line {e.lineno} of "
                          f"{e.filename}") from None
    except FileNotFoundError as e:   # a _base_ file
        raise ConfigError(f"config {args.config!r} names a file that does not exist: {e.filename!r} "
                          "(check its _base_ list, relative to the config's folder)") from None
    rebound = apply_cfg_options(cfg, args.cfg_options)
    if rebound:
        print(f"--cfg-options {describe(rebound, limit=len(rebound))}")
    if "pretrained" in cfg and cfg.pretrained is None:
        print("pretrained=None: the backbone starts from random weights (no checkpoint is loaded)")
    if load_from is not None:
        cfg.load_from = load_from
    for line in resolve_derived(cfg):
        print(f"derived: {line}")
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


def demo_data_status(cfg: Config, status: Callable[..., str]) -> Optional[str]:
    """What the demo generator would do with ``cfg.data_root`` (``"ready"``, ``"missing"``,
    ``"regenerate"``), without writing; None for a config without ``demo_coco = True`` (real data:
    never generated). A path the generator may not write (a user's folder) raises
    :class:`engine.data.DataError` naming it, in a dry run as in the real run, before anything is
    built. ``status(path, key=...)`` is tools/make_demo_coco.status."""
    if not cfg.get("demo_coco"):
        return None
    return status(cfg.data_root, key="data_root")


def ensure_demo_data(cfg: Config, generate: Callable[..., str]) -> Optional[str]:
    """Generate the synthetic demo set at ``cfg.data_root`` when a demo config (``demo_coco =
    True``) finds it missing or of an older version (only where nothing exists or into a set the
    generator made: a user's folder is refused); ``generate(path, key=...)`` is
    tools/make_demo_coco.generate, which says where it writes before writing."""
    if not cfg.get("demo_coco"):
        return None
    return generate(cfg.data_root, key="data_root")


_datasets = leaf_datasets


def _local(path: str) -> bool:
    return "://" not in path          # a URL (s3://, http://) is the file backend's to check


FIRST_FILE_NAME = re.compile(rb'"file_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _check_first_image(loader: str, ann: str, folder: str, root: str) -> None:
    """The first image the annotation file names must be in ``folder`` (cheap: the file's first
    256 KiB are searched for the first ``file_name``; nothing is said when none is found there)."""
    try:
        with open(ann, "rb") as f:
            head = f.read(256 * 1024)
    except OSError:
        return
    if not head.lstrip().startswith(b"{"):
        raise DataError(f"{loader}.dataset.ann_file {ann!r} is not a COCO-format JSON annotation file (it does not "
                        "start with '{'): check data_root (--cfg-options data_root=/path/to/coco/)")
    m = FIRST_FILE_NAME.search(head)
    if m is None:
        return
    try:
        name = json.loads(b'"' + m.group(1) + b'"')
    except ValueError:
        return
    if not os.path.isfile(os.path.join(folder, name)):
        raise DataError(f"{loader}: the first image of {ann!r}, {name!r}, is not in {folder!r} (data_root {root!r}): "
                        "the image folder does not match the annotation file; check data_root and "
                        f"{loader}.dataset.data_prefix.img")


def check_data_files(cfg: Config, loaders: Sequence[str]) -> List[str]:
    """Check the annotation files and image folders that the dataloaders ``loaders`` (e.g.
    ``train_dataloader``) and their evaluators name, as mmengine joins them with ``data_root``,
    before anything is built; raises :class:`engine.data.DataError` naming the first missing one
    and the key it came from. Returns one line per dataloader saying what it reads."""
    lines = []
    for loader in loaders:
        dl = cfg.get(loader)
        if not isinstance(dl, Mapping):
            continue
        for ds in _datasets(dl.get("dataset")):
            root = ds.get("data_root") or ""
            found = []
            ann = ds.get("ann_file")
            if ann:
                path = ann if os.path.isabs(ann) or not root else os.path.join(root, ann)
                if _local(path) and not os.path.isfile(path):
                    raise DataError(f"{loader}.dataset.ann_file {path!r} does not exist (data_root {root!r}); "
                                    "expected a COCO-format annotation file, e.g. "
                                    "DATA_ROOT/annotations/instances_train2017.json: check data_root "
                                    "(--cfg-options data_root=/path/to/coco/)")
                found.append(f"annotations {path}")
            prefix = ds.get("data_prefix") or {}
            img = prefix.get("img", prefix.get("img_path")) if isinstance(prefix, Mapping) else None
            if img is not None:
                path = img if os.path.isabs(img) or not root else os.path.join(root, img)
                if _local(path) and not os.path.isdir(path):
                    raise DataError(f"{loader}.dataset.data_prefix.img {path!r} is not a folder (data_root "
                                    f"{root!r}); expected the folder of the images the annotations name, e.g. "
                                    "DATA_ROOT/train2017/: check data_root (--cfg-options data_root=/path/to/coco/)")
                if ann and _local(path):
                    _check_first_image(loader, ann if os.path.isabs(ann) or not root else os.path.join(root, ann),
                                       path, root)
                found.append(f"images {path}")
            if found:
                lines.append(f"{loader}: " + ", ".join(found))
        evaluator = cfg.get(loader.replace("_dataloader", "_evaluator"))
        for ev in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]:
            ann = ev.get("ann_file") if isinstance(ev, Mapping) else None
            if ann and _local(ann) and not os.path.isfile(ann):
                raise DataError(f"{loader.replace('_dataloader', '_evaluator')}.ann_file {ann!r} does not exist; "
                                "expected the COCO-format annotation file the metric scores against (check "
                                "data_root: --cfg-options data_root=/path/to/coco/)")
    return lines


def check_data(cfg: Config, loaders: Sequence[str], status: Callable[..., str],
               notice: Callable[..., str]) -> List[str]:
    """The data a run will read, checked before anything is built and the same way in a dry run
    and a real one: a demo config's ``data_root`` gets the generator's verdict (a folder it may not
    write raises; a missing set is written by the real run later, :func:`ensure_demo_data`), any
    other config's annotation files and image folders must exist (:func:`check_data_files`).
    ``status`` / ``notice``: tools/make_demo_coco's. Returns the lines a dry run prints."""
    verdict = demo_data_status(cfg, status)
    if verdict is None:
        return check_data_files(cfg, loaders)
    if verdict == "ready":
        return [f"data_root {os.path.abspath(cfg.data_root)}: the synthetic demo COCO set (demo_coco = True)"]
    return [notice(cfg.data_root, verdict, key="data_root", dry_run=True)]


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
