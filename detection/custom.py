"""Settings a config may leave to the files it reads: the encoder's geometry (from ``pretrained``)
and the class names (from the training annotation file). What
``configs/detection/cascade-mask-rcnn_vit-mae_sfp_custom_coco.py`` (a user's own COCO-format folder
with the encoder they just pretrained, of any size) relies on.

- A ``PlainViT`` backbone whose ``patch_size`` / ``embed_dim`` / ``depth`` / ``num_heads`` /
  ``pretrain_img_size`` is ``None`` gets it from the checkpoint it loads (``init_cfg``; for a run
  that loads a whole detector, ``load_from``'s ``backbone.`` weights): width and patch size from the
  patch embedding, depth from the blocks, the pretraining grid from the position table, the heads
  from the file's metadata (our pretraining / ``encoder.pth`` files record them) or 64 channels a
  head (every MAE size but ViT-H, which has 16). ``global_attn_indexes=None`` becomes ViTDet's
  rule, the last block of each quarter (2, 5, 8, 11 for 12 blocks); the neck's ``in_channels`` /
  ``backbone_stride`` follow the width / patch size when ``None``.
- ``classes = None`` (a top-level variable) becomes the category names of the training annotation
  file in id order; a tuple of names is used as given. Either way every dataset's
  ``metainfo.classes`` and the heads' ``num_classes`` are set from it.

:func:`resolve_derived` does both; the entry points call it after ``--cfg-options`` and
:class:`detection.runner.DetRunner` calls it for mmdet's own tools. It changes nothing in a config
that leaves nothing to the files.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.config import ConfigError
from engine.data import DataError

from .checkpoint_io import CheckpointMismatchError, read_state_dict
from .user_settings import leaf_datasets

GEOMETRY_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "pretrain_img_size")
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}   # the MAE sizes (pretrain/models_mae.py)


def vitdet_global_blocks(depth: int) -> Tuple[int, ...]:
    """ViTDet's global-attention blocks: the last block of each quarter of the depth."""
    return tuple(sorted({max(0, (q + 1) * depth // 4 - 1) for q in range(4)}))


def encoder_geometry(path: str, what: str = "pretrained", prefix: Optional[str] = None) -> Dict[str, int]:
    """``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``pretrain_img_size`` of the ViT
    encoder in ``path`` (read memory-mapped: shapes only)."""
    sd, meta = read_state_dict(path, what, mmap=True, prefix=prefix)
    patch = sd.get("patch_embed.proj.weight")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if patch is None or patch.dim() != 4 or not blocks:
        raise CheckpointMismatchError(f"{what} {path!r} holds no ViT encoder (no patch_embed.proj.weight / blocks.N "
                                      "keys), so the backbone's geometry cannot be read from it; set "
                                      "model.backbone patch_size, embed_dim, depth, num_heads and pretrain_img_size")
    width, p = int(patch.shape[0]), int(patch.shape[-1])
    kwargs = meta.get("model_kwargs") if isinstance(meta.get("model_kwargs"), Mapping) else {}
    heads = kwargs.get("num_heads") or HEADS_BY_WIDTH.get(width) or max(1, width // 64)
    grid = None
    pos = sd.get("pos_embed")
    if pos is not None and pos.dim() == 3:
        n = int(pos.shape[1])
        for tokens in (n - 1, n):                       # with / without the cls slot
            g = math.isqrt(max(tokens, 0))
            if g > 0 and g * g == tokens:
                grid = g
                break
    size = grid * p if grid else int(kwargs.get("img_size") or 224)
    return dict(patch_size=p, embed_dim=width, depth=max(blocks) + 1, num_heads=int(heads), pretrain_img_size=size)


def _geometry_source(cfg: Any, backbone: Mapping) -> Tuple[str, str, Optional[str]]:
    init = backbone.get("init_cfg")
    if isinstance(init, Mapping) and isinstance(init.get("checkpoint"), str) and os.path.exists(
            os.path.expanduser(init["checkpoint"])):
        what = "pretrained" if init["checkpoint"] == cfg.get("pretrained") else "model.backbone.init_cfg.checkpoint"
        return init["checkpoint"], what, init.get("prefix")
    load_from = cfg.get("load_from")
    if isinstance(load_from, str) and os.path.exists(os.path.expanduser(load_from)):
        return load_from, "load_from", "backbone."
    if isinstance(init, Mapping) and isinstance(init.get("checkpoint"), str):
        return init["checkpoint"], "pretrained", init.get("prefix")   # missing: read_state_dict names it
    missing = [k for k in GEOMETRY_KEYS if backbone.get(k) is None]
    raise ConfigError(f"model.backbone leaves {', '.join(missing)} to the pretrained encoder (None), but no checkpoint "
                      "is loaded (pretrained=None): set them, e.g. --cfg-options model.backbone.embed_dim=192 "
                      "model.backbone.depth=12 model.backbone.num_heads=3 model.backbone.patch_size=16 "
                      "model.backbone.pretrain_img_size=224 (the geometry of your pretraining config)")


def resolve_encoder(cfg: Any) -> List[str]:
    """Fill a ``PlainViT`` backbone's ``None`` geometry from the checkpoint it loads (module
    docstring). Returns one line per filled field."""
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    if str(backbone.get("type", "")).split(".")[-1] != "PlainViT":
        return []
    said: List[str] = []
    if any(backbone.get(k) is None for k in GEOMETRY_KEYS):
        path, what, prefix = _geometry_source(cfg, backbone)
        geometry = encoder_geometry(path, what, prefix)
        for key in GEOMETRY_KEYS:
            if backbone.get(key) is None:
                backbone[key] = geometry[key]
                said.append(f"model.backbone.{key}={geometry[key]} (from {path})")
    if "global_attn_indexes" in backbone and backbone["global_attn_indexes"] is None \
            and isinstance(backbone.get("depth"), int):
        backbone["global_attn_indexes"] = vitdet_global_blocks(backbone["depth"])
        said.append(f"model.backbone.global_attn_indexes={backbone['global_attn_indexes']} (ViTDet: the last block "
                    "of each quarter)")
    neck = model.get("neck") or {}
    for key, source in (("in_channels", "embed_dim"), ("backbone_stride", "patch_size")):
        if key in neck and neck[key] is None and backbone.get(source) is not None:
            neck[key] = backbone[source]
            said.append(f"model.neck.{key}={neck[key]} (the backbone's {source})")
    return said


def _ann_path(ds: Mapping) -> Optional[str]:
    ann = ds.get("ann_file")
    if not isinstance(ann, str) or not ann:
        return None
    root = ds.get("data_root") or ""
    return ann if os.path.isabs(ann) or not root else os.path.join(root, ann)


def annotation_classes(cfg: Any) -> Tuple[Tuple[str, ...], str]:
    """The category names of the first annotation file the training (else validation / test)
    dataloader names, in id order, and that file; :class:`DataError` when none can be read."""
    tried: List[str] = []
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(loader)
        for ds in leaf_datasets(dl.get("dataset") if isinstance(dl, Mapping) else None):
            path = _ann_path(ds)
            if path is None:
                continue
            if not os.path.isfile(path):
                tried.append(f"{loader}.dataset.ann_file {path!r}")
                continue
            try:
                with open(path) as f:
                    cats = json.load(f).get("categories")
            except (OSError, ValueError, AttributeError) as e:
                raise DataError(f"classes=None reads the category names from {loader}.dataset.ann_file {path!r}, "
                                f"which is not a COCO-format annotation file ({type(e).__name__}: {e})") from None
            if not isinstance(cats, list) or not cats or not all(isinstance(c, Mapping) and "name" in c for c in cats):
                raise DataError(f"classes=None reads the category names from {path!r}, which has no 'categories' "
                                "list with names; set classes=('name', ...) instead")
            return tuple(str(c["name"]) for c in sorted(cats, key=lambda c: c.get("id", 0))), path
    raise DataError("classes=None reads the category names from the training annotation file, but "
                    + (f"none exists ({'; '.join(tried)}): check data_root" if tried else "no dataloader names one")
                    + " (or set classes=('name', ...))")


def _set_num_classes(model: Mapping, n: int) -> List[str]:
    changed: List[str] = []
    heads: List[Tuple[str, Any]] = [("bbox_head", model.get("bbox_head"))]
    roi = model.get("roi_head") or {}
    heads += [("roi_head.bbox_head", roi.get("bbox_head")), ("roi_head.mask_head", roi.get("mask_head"))]
    for path, head in heads:
        for i, h in enumerate(head if isinstance(head, (list, tuple)) else [head]):
            if isinstance(h, dict) and "num_classes" in h and h["num_classes"] != n:
                h["num_classes"] = n
                changed.append(f"model.{path}" + (f"[{i}]" if isinstance(head, (list, tuple)) else "") + ".num_classes")
    return changed


def resolve_classes(cfg: Any) -> List[str]:
    """Apply the top-level ``classes`` (``None``: from the annotation file) to every dataset's
    ``metainfo`` and the heads' ``num_classes``; nothing for a config without ``classes``."""
    if "classes" not in cfg:
        return []
    classes: Any = cfg.classes
    said: List[str] = []
    if classes is None:
        classes, path = annotation_classes(cfg)
        said.append(f"classes: the {len(classes)} categories of {path}")
    elif isinstance(classes, str) or not isinstance(classes, Sequence) or not classes \
            or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"classes must be None (the annotation file's categories) or a tuple of category names, "
                          f"got {classes!r}")
    classes = tuple(classes)
    cfg["classes"] = classes
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg.get(loader)
        for ds in leaf_datasets(dl.get("dataset") if isinstance(dl, Mapping) else None):
            meta = dict(ds.get("metainfo") or {})
            if tuple(meta.get("classes") or ()) != classes:
                meta["classes"] = classes
                ds["metainfo"] = meta
    changed = _set_num_classes(cfg.get("model") or {}, len(classes))
    if changed:
        said.append(f"num_classes={len(classes)}: {', '.join(changed)}")
    return said


def resolve_derived(cfg: Any) -> List[str]:
    """:func:`resolve_encoder` and :func:`resolve_classes`; the lines say what was derived."""
    return resolve_encoder(cfg) + resolve_classes(cfg)
