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

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from mmengine.config import Config

from engine.config import ConfigError

from .preprocess import square_size_of

# Top-level config variables a user sets; configs derive other fields from them
# (dataset data_root, evaluator ann_file, backbone init_cfg checkpoint).
USER_VARIABLES = ("data_root", "pretrained")


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


def rebind_from_file(cfg: Config) -> List[str]:
    """:func:`rebind` against the values in ``cfg.filename`` (parsed again): fields that still hold
    the file's value follow a changed ``data_root`` / ``pretrained``; fields whose value differs
    from the file's were set on purpose and stay. Nothing happens for a config without a file."""
    filename = getattr(cfg, "filename", None)
    if not filename or not os.path.isfile(filename) or not user_values(cfg):
        return []
    original = Config.fromfile(filename)
    old = user_values(original)
    if all(cfg.get(k) == v for k, v in old.items()):
        return []
    file_values = {path: c[k] for c, k, path in string_slots(original._cfg_dict)}
    current = {path: c[k] for c, k, path in string_slots(cfg._cfg_dict)}
    return rebind(cfg, old, keep=lambda path: file_values.get(path) != current[path])


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
    return f"data_root / pretrained re-applied to: {shown}"
