"""Load ViT weights from any of our / official checkpoint formats into the detection backbone.

Accepted files (all read with ``weights_only=True``):
  1. our MAE pretraining checkpoint ``{"model": encoder + decoder + mask_token, "meta": ...}``;
  2. our encoder export ``encoder.pth`` ``{"model": encoder, "meta": ...}``;
  3. our fine-tuned classifier (timm ViT, global pool) ``{"model": ... fc_norm.*, head.*}``;
  4. official MAE releases ``{"model": encoder}`` or the full model with the decoder;
  and a bare state dict or ``{"state_dict": ...}``.

Keys are official MAE / timm names, which the backbone shares. What the backbone does not use is
an *expected* miss (decoder, mask token, cls token, final / fc norm, classification head) and so
are detection-only parameters absent from every pretraining file (relative position biases).
Everything else is a real error: backbone weights missing from the file, unknown keys (another
architecture), or shape mismatches; they raise :class:`CheckpointMismatchError` with the report.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from engine.checkpoint import load_checkpoint
from pretrain.pos_embed import resample_pos_embed

# (key prefix in the file, why the backbone does not use it)
UNUSED_IN_FILE: Tuple[Tuple[str, str], ...] = (
    ("decoder_", "MAE decoder (pretraining only)"),
    ("mask_token", "MAE mask token (pretraining only)"),
    ("cls_token", "cls token (detection uses the patch tokens only)"),
    ("norm.", "final encoder norm (the feature pyramid normalises its own levels)"),
    ("fc_norm.", "classifier norm (global-pool fine-tuning)"),
    ("head.", "classification head"),
)
# backbone parameters no pretraining file holds (suffix, why)
DETECTION_ONLY: Tuple[Tuple[str, str], ...] = (
    (".rel_pos_h", "relative position bias (detection-only, zero-initialised)"),
    (".rel_pos_w", "relative position bias (detection-only, zero-initialised)"),
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class CheckpointMismatchError(RuntimeError):
    """The file does not fit the backbone (missing weights, unknown keys or shape mismatches)."""


@dataclass
class KeyReport:
    """What a load did with every key: loaded, expected misses (by reason) and real errors."""
    path: str
    loaded: List[str] = field(default_factory=list)
    unused: Dict[str, List[str]] = field(default_factory=dict)          # in the file, not needed
    detection_only: Dict[str, List[str]] = field(default_factory=dict)  # in the model, never in files
    missing: List[str] = field(default_factory=list)                    # errors from here on
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    hints: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        def abridge(keys: List[str], n: int = 6) -> str:
            return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")

        lines = [f"checkpoint {self.path}: {len(self.loaded)} tensors loaded into the backbone"]
        lines += [f"  note: {n}" for n in self.notes]
        for why, keys in {**self.unused, **self.detection_only}.items():
            lines.append(f"  expected miss, {why}: {len(keys)} key(s): {abridge(keys)}")
        if self.missing:
            lines.append(f"  ERROR backbone weights missing from the file: {len(self.missing)}: {abridge(self.missing)}")
        if self.unexpected:
            lines.append(f"  ERROR keys the backbone does not have: {len(self.unexpected)}: {abridge(self.unexpected)}")
        for key, src, dst in self.mismatched:
            lines.append(f"  ERROR shape mismatch {key}: file {list(src)} vs backbone {list(dst)}")
        lines += [f"  hint: {h}" for h in self.hints]
        return "\n".join(lines)


def read_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, meta) from any accepted file; ``module.`` prefixes (DDP) are stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path} not found: set `pretrained` in the config "
                                "(or --cfg-options pretrained=PATH)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    sd = ckpt
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    tensors = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{path} holds no tensors (top-level keys: {sorted(ckpt)[:10]})")
    return tensors, meta


def convert_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, str]:
    """[1, (1) + G*G, D] table -> [1, gh*gw, D] for the backbone grid: drops the cls slot (a
    token count one above a square) and resamples bicubically when the grids differ."""
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointMismatchError(f"pos_embed must have shape [1, N, D], got {list(pos.shape)}")
    n = pos.shape[1]
    side = math.isqrt(n)
    prefix = 0
    if side * side != n:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise CheckpointMismatchError(f"pos_embed has {n} tokens: neither a square grid nor cls + square grid")
        prefix = 1
    pos = pos[:, prefix:]
    note = f"pos_embed {n} tokens -> {'cls slot dropped, ' if prefix else ''}grid {side}x{side}"
    if (side, side) != tuple(grid):
        pos = resample_pos_embed(pos.float(), grid, (side, side))
        note += f" resampled (bicubic, as MAE / ViTDet) to {grid[0]}x{grid[1]}"
    return pos, note


def _reason(key: str, table: Tuple[Tuple[str, str], ...], suffix: bool = False) -> Optional[str]:
    for pattern, why in table:
        if (key.endswith(pattern) if suffix else key.startswith(pattern)):
            return why
    return None


def _depth(keys) -> int:
    ids = [int(m.group(1)) for k in keys for m in [_BLOCK.match(k)] if m]
    return 1 + max(ids) if ids else 0


def map_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module, path: str = "<state dict>",
                   ) -> Tuple[Dict[str, torch.Tensor], KeyReport]:
    """Map a file's state dict onto ``model`` (a :class:`~detection.vit.PlainViT`); never raises
    on mismatches, the report says what is wrong (see :func:`load_backbone_checkpoint`)."""
    target = model.state_dict()
    report = KeyReport(path)
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "pos_embed" and key in target:
            value, note = convert_pos_embed(value, model.pretrain_grid)
            report.notes.append(note)
        if key in target:
            if tuple(value.shape) != tuple(target[key].shape):
                report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
            else:
                out[key] = value.to(target[key].dtype)
                report.loaded.append(key)
            continue
        why = _reason(key, UNUSED_IN_FILE)
        if key == "pos_embed":
            why = "absolute position embedding (backbone built with use_abs_pos=False)"
        if why is None:
            report.unexpected.append(key)
        else:
            report.unused.setdefault(why, []).append(key)
    for key in target:
        if key in sd:
            continue
        why = _reason(key, DETECTION_ONLY, suffix=True)
        if why is None:
            report.missing.append(key)
        else:
            report.detection_only.setdefault(why, []).append(key)

    file_depth, model_depth = _depth(sd), _depth(target)
    if file_depth != model_depth:
        report.hints.append(f"the file has {file_depth} blocks, the backbone depth={model_depth}")
    if any(k.startswith("backbone.") for k in report.unexpected):
        report.hints.append("this looks like a whole detector's checkpoint: resume it or set load_from=PATH, "
                            "init_cfg is for backbone weights")
    for key, src, dst in report.mismatched:
        if key == "patch_embed.proj.weight":
            report.hints.append(f"the file has patch size {src[-1]} and width {src[0]}; "
                                f"the backbone patch_size={dst[-1]}, embed_dim={dst[0]}")
    return out, report


def load_backbone_checkpoint(model: nn.Module, path: str, logger: Optional[logging.Logger] = None) -> KeyReport:
    """Load ``path`` into ``model`` and log the key report; any real error raises
    :class:`CheckpointMismatchError` before a single weight is copied."""
    sd, meta = read_state_dict(path)
    mapped, report = map_state_dict(sd, model, path)
    if meta.get("kind"):
        report.notes.insert(0, f"file kind {meta['kind']!r}")
    text = report.format()
    if not report.ok:
        raise CheckpointMismatchError(f"cannot load {path} into {type(model).__name__}:\n{text}")
    model.load_state_dict(mapped, strict=False)
    if logger is not None:
        logger.info(text)
    return report
