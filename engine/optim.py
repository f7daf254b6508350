"""Optimizer parameter groups: weight-decay exclusion and layer-wise lr decay for ViTs.

One implementation serves MAE fine-tuning and the MMDetection plug-in (which imports it without
pulling mm* into the core). Layer ids follow MAE/BEiT/ViTDet: 0 for the embeddings (patch
embedding, cls/register tokens, position embeddings), i + 1 for ``blocks.i``, depth + 1 for
everything after the blocks (final norm, fc_norm, head, a detection neck or head). A layer's LR
scale is ``layer_decay ** (depth + 1 - layer_id)``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

_EMBED = re.compile(r"(^|\.)(cls_token|reg_token|dist_token|pos_embed|patch_embed)(\.|$)")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of parameter ``name`` (any prefix, e.g. ``backbone.blocks.3.attn.qkv.weight``)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(2)) + 1
    if _EMBED.search(name):
        return 0
    return depth + 1


def no_weight_decay(name: str, param: torch.Tensor, skip: Collection[str]) -> bool:
    """Norm weights and biases (1-D), and the named tokens / position embeddings, are not decayed."""
    short = name.split(".")[-1]
    return param.ndim <= 1 or name.endswith(".bias") or name in skip or short in skip


def param_groups_layer_decay(named_params: Iterable[Tuple[str, nn.Parameter]], depth: int, weight_decay: float,
                             layer_decay: float, skip: Collection[str] = ("cls_token", "pos_embed", "dist_token", "reg_token"),
                             no_decay: Optional[Callable[[str, nn.Parameter], bool]] = None) -> List[Dict[str, Any]]:
    """Groups keyed by (layer, decay or not), each with ``lr_scale``, ``weight_decay`` and the
    parameter names (``names``, for the run log). ``layer_decay=1`` gives plain groups.
    ``no_decay(name, param)``: which parameters get no weight decay (default
    :func:`no_weight_decay` with ``skip``; the detection plug-in passes ViTDet's rule)."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lid = vit_layer_id(name, depth)
        nd = no_decay(name, p) if no_decay is not None else no_weight_decay(name, p, skip)
        g = groups.setdefault((lid, nd), {"params": [], "names": [], "layer_id": lid,
                                          "lr_scale": layer_decay ** (depth + 1 - lid),
                                          "weight_decay": 0.0 if nd else weight_decay})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def describe_groups(groups: List[Dict[str, Any]]) -> str:
    """One line per group: layer, lr scale, weight decay, parameter count and names (abridged)."""
    lines = []
    for g in groups:
        names = g.get("names", [])
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
        n = sum(p.numel() for p in g["params"])
        lines.append(f"layer {g.get('layer_id', '-'):>3}  lr_scale {g.get('lr_scale', 1.0):.4f}  "
                     f"weight_decay {g['weight_decay']:.3g}  {n:>10,d} params  {shown}")
    return "\n".join(lines)
