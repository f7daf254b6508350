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
Every file a user names (``pretrained``, a detector checkpoint to test or resume) that cannot be
used raises :class:`engine.checkpoint.CheckpointError` (a user error: exit code 2 and the message
in the command lines), naming the file, the setting it came from and what is expected.
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

from engine.checkpoint import CheckpointError, check_checkpoint_file, load_checkpoint
from engine.pos_embed import resample_pos_embed

from .safe_load import mmengine_checkpoint_globals

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
# what a file named by `pretrained` may be (the end of its error messages)
PRETRAINED_EXPECTED = ("backbone weights written by torch.save: our MAE pretraining checkpoint "
                       "(train.output_dir/checkpoints/*.pth), encoder.pth or fine-tuned classifier, or an official "
                       "MAE / timm ViT state dict, of the config's backbone geometry")


class CheckpointMismatchError(CheckpointError):
    """The file does not fit the backbone (missing weights, unknown keys or shape mismatches): a
    user error, as every :class:`~engine.checkpoint.CheckpointError`."""


def read_checkpoint(path: str, what: str, expected: str, mmap: bool = False) -> Any:
    """``path`` loaded on the CPU with ``weights_only=True`` (mmengine training checkpoints'
    log history allowed: see :func:`detection.safe_load.mmengine_checkpoint_globals`), or
    :class:`CheckpointError` naming ``what`` (the setting the path came from) and ``expected``.

    ``mmap=True`` leaves the tensors on disk where the file's format allows (a cheap up-front
    check of a large file: only its pickled structure is read)."""
    path = os.path.expanduser(path)
    check_checkpoint_file(path, what, expected)
    with mmengine_checkpoint_globals():
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:   # the legacy format cannot be mapped; a bad file fails below, with its message
                pass
        return load_checkpoint(path, what, expected)


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
    invalid: List[str] = field(default_factory=list)                    # tensors that cannot be converted
    notes: List[str] = field(default_factory=list)
    hints: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.invalid)

    def format(self, errors_only: bool = False, max_mismatches: int = 4) -> str:
        """The report, a line per kind of key; ``errors_only`` leaves out the expected misses
        (for an error message). Shape mismatches beyond ``max_mismatches`` are counted, not listed
        (the patch embedding first: with the hints it tells the file's architecture)."""
        def abridge(keys: List[str], n: int = 6) -> str:
            return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")

        expected = {**self.unused, **self.detection_only}
        if errors_only:
            n_file = (len(self.loaded) + sum(map(len, self.unused.values())) + len(self.unexpected)
                      + len(self.mismatched) + len(self.invalid))
            lines = [f"  {len(self.loaded)} of the file's {n_file} tensors fit the backbone"]
        else:
            lines = [f"checkpoint {self.path}: {len(self.loaded)} tensors loaded into the backbone"]
        lines += [f"  note: {n}" for n in self.notes]
        if errors_only and expected:
            counts = ", ".join(f"{len(keys)} {why.split(' (')[0]}" for why, keys in expected.items())
            lines.append(f"  (expected misses, not errors: {counts})")
        else:
            for why, keys in expected.items():
                lines.append(f"  expected miss, {why}: {len(keys)} key(s): {abridge(keys)}")
        lines += [f"  ERROR {msg}" for msg in self.invalid]
        if self.missing:
            lines.append(f"  ERROR backbone weights missing from the file: {len(self.missing)}: {abridge(self.missing)}")
        if self.unexpected:
            lines.append(f"  ERROR keys the backbone does not have: {len(self.unexpected)}: {abridge(self.unexpected)}")
        shown = sorted(self.mismatched, key=lambda m: m[0] != "patch_embed.proj.weight")
        for key, src, dst in shown[:max_mismatches]:
            lines.append(f"  ERROR shape mismatch {key}: file {list(src)} vs backbone {list(dst)}")
        if len(shown) > max_mismatches:
            lines.append(f"  ERROR ... and {len(shown) - max_mismatches} more shape mismatches")
        lines += [f"  hint: {h}" for h in self.hints]
        return "\n".join(lines)


def read_state_dict(path: str, what: str = "pretrained", mmap: bool = False, prefix: Optional[str] = None,
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, meta) from any accepted file; ``module.`` prefixes (DDP) are stripped, and
    with ``prefix`` (e.g. ``'backbone.'``: the backbone of a whole detector's checkpoint) only the
    keys under it are kept, without it. A file that is missing, unreadable or holds no state dict
    (or none under ``prefix``) raises :class:`CheckpointError` naming ``what``, the setting the
    path came from."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist: set `pretrained` in the config (or "
                              f"--cfg-options pretrained=PATH) to {PRETRAINED_EXPECTED}")
    ckpt = read_checkpoint(path, what, PRETRAINED_EXPECTED, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{what} {path!r} holds a {type(ckpt).__name__}, not a state dict; "
                                      f"expected {PRETRAINED_EXPECTED}")
    sd = ckpt
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    tensors = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{what} {path!r} holds no tensors (top-level keys: "
                                      f"{sorted(map(str, ckpt))[:10]}); expected {PRETRAINED_EXPECTED}")
    if prefix:
        under = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not under:
            heads = sorted({k.split(".")[0] + "." for k in tensors})[:8]
            raise CheckpointMismatchError(f"{what} {path!r} has no keys under init_cfg prefix {prefix!r} (its key "
                                          f"prefixes: {heads}); drop the prefix for backbone weights, or name the "
                                          "part of a detector checkpoint that holds the backbone")
        tensors = under
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
            try:
                value, note = convert_pos_embed(value, model.pretrain_grid)
            except CheckpointMismatchError as e:
                report.invalid.append(str(e))
                continue
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
    detector = any(k.startswith("backbone.") for k in report.unexpected)
    if file_depth != model_depth and not detector:
        report.hints.append(f"the file has {file_depth} blocks, the backbone depth={model_depth}")
    if detector:
        report.hints.append("this looks like a whole detector's checkpoint: resume it, set load_from=PATH, or "
                            "take its backbone with init_cfg=dict(type='Pretrained', checkpoint=PATH, "
                            "prefix='backbone.')")
    for key, src, dst in report.mismatched:
        if key == "patch_embed.proj.weight":
            report.hints.append(f"the file has patch size {src[-1]} and width {src[0]}; "
                                f"the backbone patch_size={dst[-1]}, embed_dim={dst[0]}")
    return out, report


def _describe(model: nn.Module) -> str:
    keys = ("img_size", "pretrain_img_size", "patch_size", "embed_dim", "depth")
    geometry = ", ".join(f"{k}={getattr(model, k)}" for k in keys if hasattr(model, k))
    return f"{type(model).__name__}({geometry})"


def check_file(model: nn.Module, path: str, what: str, mmap: bool = False, prefix: Optional[str] = None,
               ) -> Tuple[Dict[str, torch.Tensor], KeyReport]:
    """``path``'s state dict mapped onto ``model`` and the key report, or :class:`CheckpointMismatchError`
    (``mmap``: shapes only, for a check on a ``meta`` model)."""
    sd, meta = read_state_dict(path, what, mmap=mmap, prefix=prefix)
    mapped, report = map_state_dict(sd, model, path)
    if meta.get("kind"):
        report.notes.insert(0, f"file kind {meta['kind']!r}")
    if prefix:
        report.notes.insert(0, f"keys under {prefix!r} (prefix removed)")
    if not report.ok:
        raise CheckpointMismatchError(
            f"{what} {path!r} does not fit the backbone {_describe(model)}:\n{report.format(errors_only=True)}\n"
            f"expected {PRETRAINED_EXPECTED} (set pretrained=PATH, e.g. --cfg-options pretrained=PATH)")
    return mapped, report


def load_backbone_checkpoint(model: nn.Module, path: str, logger: Optional[logging.Logger] = None,
                             what: str = "pretrained", prefix: Optional[str] = None) -> KeyReport:
    """Load ``path`` into ``model`` and log the key report; any real error raises
    :class:`CheckpointMismatchError` before a single weight is copied. ``what`` names the setting
    the path came from in errors; ``prefix`` selects the keys under it (``'backbone.'``)."""
    mapped, report = check_file(model, path, what, prefix=prefix)
    model.load_state_dict(mapped, strict=False)
    if logger is not None:
        logger.info(report.format())
    return report
