"""The user settings of the detection configs (``data_root``, ``pretrained``) and the fields
derived from them, under every entry point.

A config derives fields from its top-level variables when it is parsed (``data_root +
'annotations/...'``, ``init_cfg=dict(checkpoint=pretrained)``), so ``--cfg-options data_root=...``,
merged afterwards, would change the variable and leave the derived fields at the file's value.
:func:`rebind` re-applies a changed variable to every string derived from its old value: equal
to it or, for a folder (ending in '/'), starting with it. :func:`rebind_from_file` recovers the
old values by parsing the config file again, which is what lets :class:`detection.runner.DetRunner`
(the configs' ``runner_type``) do it for mmdet's own ``tools/train.py`` / ``tools/test.py`` too.
:func:`check_model_config` checks what a config cannot express: the padded square and the
backbone's input size must agree.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from mmengine.config import Config

from engine.config import ConfigError

from .preprocess import square_size_of

# Top-level config variables a user sets; configs derive other fields from them
# (dataset data_root, evaluator ann_file, backbone init_cfg checkpoint).
USER_VARIABLES = ("data_root", "pretrained")
# values of `pretrained` that mean "no checkpoint: random initialisation"
RANDOM_INIT = (None, "", "none", "None")
# pipeline transforms whose size follows image_size, and the keys holding it
SIZED_TRANSFORMS = {"Resize": "scale", "RandomResize": "scale", "RandomChoiceResize": "scales",
                    "RandomCrop": "crop_size", "Pad": "size", "FixedShapeResize": "scale"}


def random_init(value: Any) -> bool:
    """Whether a ``pretrained`` value asks for random initialisation (None, '', 'none')."""
    return any(value is v or (isinstance(value, str) and value == v) for v in RANDOM_INIT)


def string_slots(node: Any, path: str = "") -> Iterator[Tuple[Any, Any, str]]:
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
            yield from string_slots(value, sub)


def user_values(cfg: Config) -> Dict[str, str]:
    """The user variables a config sets (string values only)."""
    return {k: cfg[k] for k in USER_VARIABLES if isinstance(cfg.get(k), str)}


def rebind(cfg: Config, old: Mapping[str, str], keep: Callable[[str], bool] = lambda path: False) -> List[str]:
    """Re-apply every user variable whose value differs from ``old`` to the strings derived from
    its old value, except the fields ``keep(path)`` names (set explicitly). A folder keeps its
    trailing '/'. Returns the paths of the fields changed."""
    changed: List[str] = []
    for key, was in old.items():
        new = cfg.get(key)
        if new == was:
            continue
        if key == "pretrained" and random_init(new):
            cfg[key] = None
            changed += drop_pretrained_init(cfg, was, keep)
            continue
        if not isinstance(new, str):
            raise ConfigError(f"{key} must be a path string, got {new!r}")
        if was.endswith("/") and not new.endswith("/"):
            new += "/"
            cfg[key] = new
        for container, k, path in string_slots(cfg._cfg_dict):
            if path in USER_VARIABLES or keep(path):
                continue
            value = container[k]
            if value == was or (was.endswith("/") and value.startswith(was)):
                container[k] = new + value[len(was):]
                changed.append(path)
    return changed


def drop_pretrained_init(cfg: Config, was: str, keep: Callable[[str], bool] = lambda path: False) -> List[str]:
    """Remove every ``init_cfg=dict(type='Pretrained', checkpoint=was)`` (``pretrained=None``:
    the module starts from its random initialisation), except where ``keep(path)`` names the
    ``init_cfg`` or its checkpoint. Returns the paths of the removed ``init_cfg`` fields."""
    changed: List[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                sub = f"{path}.{key}" if path else str(key)
                if key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained" \
                        and value.get("checkpoint") == was and not keep(sub) and not keep(f"{sub}.checkpoint"):
                    node[key] = None
                    changed.append(sub)
                else:
                    walk(value, sub)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(cfg._cfg_dict, "")
    return changed


def leaf_datasets(ds: Any) -> List[Mapping]:
    """The leaf dataset configs of a dataloader's ``dataset`` (wrappers such as RepeatDataset,
    ClassBalancedDataset or ConcatDataset unwrapped)."""
    if not isinstance(ds, Mapping):
        return []
    if isinstance(ds.get("datasets"), (list, tuple)):
        return [leaf for d in ds["datasets"] for leaf in leaf_datasets(d)]
    if isinstance(ds.get("dataset"), Mapping):
        return leaf_datasets(ds["dataset"])
    return [ds]


def _resize_transforms(transforms: Any, size: int, path: str, changed: List[str]) -> None:
    if not isinstance(transforms, (list, tuple)):
        return
    for i, t in enumerate(transforms):
        sub = f"{path}[{i}]"
        if isinstance(t, (list, tuple)):                    # RandomChoice: a list of pipelines
            _resize_transforms(t, size, sub, changed)
            continue
        if not isinstance(t, dict):
            continue
        key = SIZED_TRANSFORMS.get(str(t.get("type", "")).split(".")[-1])
        if key is not None and t.get(key) is not None:
            value = [(size, size)] if key == "scales" else (size, size)
            if t[key] != value:
                t[key] = value
                changed.append(f"{sub}.{key}")
        _resize_transforms(t.get("transforms"), size, f"{sub}.transforms", changed)


def apply_image_size(cfg: Config, size: Any) -> List[str]:
    """Make every input size of the config ``size`` x ``size``: ``image_size``, the padded square
    (``model.data_preprocessor.square_size``), a ``PlainViT``'s ``img_size`` (its relative-position
    tables) and the ``scale`` / ``scales`` / ``crop_size`` of every Resize, RandomResize,
    RandomChoiceResize and RandomCrop in the dataloaders' pipelines (large-scale jitter keeps its
    0.1-2.0 range, of ``size``). For smoke runs of the 1024-px configs at a small square, e.g.
    128. Returns the paths of the fields changed."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"image_size must be a whole number of pixels >= 16 (the square every image is resized "
                          f"to fit and padded to), got {size!r}")
    changed: List[str] = []
    cfg["image_size"] = size
    model = cfg.get("model") or {}
    pre = model.get("data_preprocessor") or {}
    if "square_size" in pre and pre["square_size"] != size:
        pre["square_size"] = size
        changed.append("model.data_preprocessor.square_size")
    backbone = model.get("backbone") or {}
    if str(backbone.get("type", "")).split(".")[-1] == "PlainViT" and backbone.get("img_size") != size:
        backbone["img_size"] = size
        changed.append("model.backbone.img_size")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(loader)
        for i, ds in enumerate(leaf_datasets(dl.get("dataset") if isinstance(dl, Mapping) else None)):
            _resize_transforms(ds.get("pipeline"), size, f"{loader}.dataset.pipeline", changed)
    for name in ("train_pipeline", "test_pipeline"):
        _resize_transforms(cfg.get(name), size, name, changed)
    return list(dict.fromkeys(changed))


_PARSED: Dict[Tuple[str, float], Config] = {}


def parse_config_file(path: str) -> Config:
    """``Config.fromfile(path)``, parsed once per file and modification time (a copy each call):
    resolving the ``mmdet::`` bases reads mmdet's model-index files, about a second a parse, and an
    entry point parses a config twice (itself, then :class:`detection.runner.DetRunner`)."""
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _PARSED:
        _PARSED[key] = Config.fromfile(path)
    return copy.deepcopy(_PARSED[key])


def rebind_from_file(cfg: Config) -> List[str]:
    """:func:`rebind` against the values in ``cfg.filename`` (parsed again): fields that still hold
    the file's value follow a changed ``data_root`` / ``pretrained``; fields whose value differs
    from the file's were set on purpose and stay. An ``image_size`` other than the file's is
    applied everywhere (:func:`apply_image_size`). Nothing happens for a config without a file."""
    filename = getattr(cfg, "filename", None)
    if not filename or not os.path.isfile(filename):
        return []
    original = parse_config_file(filename)
    changed: List[str] = []
    size = cfg.get("image_size")
    if size is not None and size != original.get("image_size"):
        changed += apply_image_size(cfg, size)
    old = user_values(original)
    if old and not all(cfg.get(k) == v for k, v in old.items()):
        file_values = {path: c[k] for c, k, path in string_slots(original._cfg_dict)}
        current = {path: c[k] for c, k, path in string_slots(cfg._cfg_dict)}
        changed += rebind(cfg, old, keep=lambda path: file_values.get(path) != current.get(path))
    return changed


def check_model_config(cfg: Config) -> None:
    """A ``PlainViT`` with relative position tables behind a ``SquarePadDataPreprocessor`` must be
    built for the square it sees (``model.backbone.img_size == model.data_preprocessor.square_size``);
    otherwise every forward resamples its tables (not the model the config claims)."""
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    square = square_size_of(model)
    if square is None or str(backbone.get("type", "")).split(".")[-1] != "PlainViT" or not backbone.get("use_rel_pos"):
        return
    img_size = backbone.get("img_size", 1024)
    if img_size != square:
        raise ConfigError(f"model.backbone.img_size={img_size} but model.data_preprocessor.square_size={square}: "
                          "the backbone's relative-position tables are sized for img_size and every image is padded "
                          "to square_size; set both to the same value (ViTDet: 1024)")


def describe(changed: List[str], limit: int = 8) -> Optional[str]:
    """One line naming the fields a re-application changed, or ``None``."""
    if not changed:
        return None
    shown = ", ".join(changed[:limit]) + (f", ... (+{len(changed) - limit})" if len(changed) > limit else "")
    return f"data_root / pretrained / image_size re-applied to: {shown}"
