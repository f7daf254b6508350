"""Our supervised Swin checkpoints (``python -m finetune``: timm keys) in mmdet's ``SwinTransformer``.

The papers' COCO table (EfficientTrain++ Table 17, EfficientTrain Table 12) puts curriculum-trained
Swin backbones under RetinaNet and Cascade Mask R-CNN (1x). mmdet's ``SwinTransformer`` converts
the official Swin release (``convert_weights=True``) but not timm's layout, which our fine-tuning
writes. :class:`TimmSwinTransformer` is mmdet's backbone with a loader for both layouts and the
same key report as the ViT (:class:`detection.checkpoint_io.KeyReport`):

- timm >= 0.9 (ours): ``layers.i.downsample`` is the patch merging at the *start* of stage i
  (i >= 1), mmdet's ``stages.{i-1}.downsample`` ends stage i-1; the official release and older
  timm put it at the end already (``layers.0.downsample`` exists), so no shift;
- ``attn.*`` -> ``attn.w_msa.*``, ``mlp.fc1`` / ``mlp.fc2`` -> ``ffn.layers.0.0`` / ``ffn.layers.1``,
  ``patch_embed.proj`` -> ``patch_embed.projection``, ``layers`` -> ``stages``;
- the patch-merging reduction and norm are reordered: timm and the official code concatenate the
  2x2 neighbours position by position (x0, x1, x2, x3 = (0,0), (1,0), (0,1), (1,1)), mmdet's
  ``nn.Unfold`` channel by channel in row order (as mmdet's own ``swin_converter`` does).

Expected misses: the classification head, the final norm (detection adds an output norm per
stage, ``norm0``..``norm3``, initialised to identity scale), relative-position index and attention
mask buffers (computed by the model). Anything else (missing weights, unknown keys, another
window size or width) raises :class:`~detection.checkpoint_io.CheckpointMismatchError` with the
report before a weight is copied.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model.weight_init import constant_init, trunc_normal_init

from mmdet.models.backbones import SwinTransformer
from mmdet.registry import MODELS

from engine.config import ConfigError

from .checkpoint_io import CheckpointMismatchError, KeyReport, read_state_dict

SWIN_EXPECTED = ("a Swin classifier written by `python -m finetune` (runs/<run>/checkpoints/*.pth, timm keys) or "
                 "the official Swin release, of the config's backbone geometry")
UNUSED_IN_FILE = (("head.", "classification head"),
                  ("norm.", "final norm (detection adds an output norm per stage)"))
BUFFERS = (".relative_position_index", ".attn_mask")
_STAGE = re.compile(r"^layers\.(\d+)\.(.*)$")


def _unfold_order(key: str, value: torch.Tensor) -> torch.Tensor:
    """Patch-merging weights from position-major neighbour order to nn.Unfold's channel-major order."""
    if key.endswith("downsample.reduction.weight"):
        out, inp = value.shape
        return value.reshape(out, 4, inp // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out, inp)
    if ".downsample.norm." in key:
        n = value.shape[0]
        return value.reshape(4, n // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(n)
    return value


def swin_key(key: str, merge_at_start: bool) -> Optional[str]:
    """mmdet ``SwinTransformer`` name of a timm / official Swin key, or ``None`` when it has none."""
    if key.startswith("patch_embed."):
        return key.replace("patch_embed.proj.", "patch_embed.projection.")
    m = _STAGE.match(key)
    if not m:
        return None
    stage, rest = int(m.group(1)), m.group(2)
    if rest.startswith("downsample."):
        stage -= 1 if merge_at_start else 0
        return f"stages.{stage}.{rest}" if stage >= 0 else None
    rest = (rest.replace("attn.", "attn.w_msa.", 1).replace("mlp.fc1.", "ffn.layers.0.0.")
            .replace("mlp.fc2.", "ffn.layers.1."))
    return f"stages.{stage}.{rest}"


def map_swin_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module, path: str = "<state dict>",
                        ) -> Tuple[Dict[str, torch.Tensor], KeyReport]:
    """Map a timm / official Swin state dict onto mmdet's ``SwinTransformer`` ``model``; never
    raises on mismatches, the report says what is wrong (see :func:`load_swin_checkpoint`)."""
    target = model.state_dict()
    report = KeyReport(path)
    merge_at_start = not any(k.startswith("layers.0.downsample.") for k in sd)
    report.notes.append("timm layout (patch merging at the start of a stage)" if merge_at_start
                        else "official Swin layout (patch merging at the end of a stage)")
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(BUFFERS):
            report.unused.setdefault("buffers computed by the model (relative position index, attention mask)",
                                     []).append(key)
            continue
        new = swin_key(key, merge_at_start)
        if new is None or new not in target:
            why = next((w for p, w in UNUSED_IN_FILE if key.startswith(p)), None)
            if why is None:
                report.unexpected.append(key)
            else:
                report.unused.setdefault(why, []).append(key)
            continue
        value = _unfold_order(new, value)
        if tuple(value.shape) != tuple(target[new].shape):
            report.mismatched.append((new, tuple(value.shape), tuple(target[new].shape)))
            continue
        out[new] = value.to(target[new].dtype)
        report.loaded.append(new)
    for key in target:
        if key in out or any(new == key for new, _, _ in report.mismatched):
            continue
        if key.endswith(".relative_position_index"):
            report.detection_only.setdefault("relative position index (a buffer computed by the model)",
                                             []).append(key)
        elif re.match(r"^norm\d+\.", key):
            report.detection_only.setdefault("output norm of a stage (detection-only, identity init)",
                                             []).append(key)
        else:
            report.missing.append(key)
    for key, src, dst in report.mismatched:
        if key.endswith("relative_position_bias_table"):
            report.hints.append(f"{key}: the file's window has {src[0]} relative positions, the backbone's "
                                f"{dst[0]} (window_size={_window(model)}); a Swin fine-tuned "
                                "at 224 px has window_size=7")
            break
    if report.mismatched and report.mismatched[0][0] == "patch_embed.projection.weight":
        report.hints.append(f"the file has width {report.mismatched[0][1][0]}, the backbone embed_dims="
                            f"{report.mismatched[0][2][0]}")
    return out, report


def _window(model: nn.Module) -> Any:
    return model.stages[0].blocks[0].attn.w_msa.window_size[0] if len(model.stages) else "?"


def _describe(model: nn.Module) -> str:
    depths = [len(s.blocks) for s in model.stages]
    return (f"TimmSwinTransformer(embed_dims={model.patch_embed.projection.out_channels}, depths={depths}, "
            f"window_size={_window(model)})")


def _check(model: nn.Module, path: str, what: str, mmap: bool = False) -> Tuple[Dict[str, torch.Tensor], KeyReport]:
    sd, meta = read_state_dict(path, what, mmap=mmap)
    mapped, report = map_swin_state_dict(sd, model, path)
    if meta.get("kind"):
        report.notes.insert(0, f"file kind {meta['kind']!r}" + (f", model {meta['model_name']!r}"
                                                                 if meta.get("model_name") else ""))
    if not report.ok:
        raise CheckpointMismatchError(
            f"{what} {path!r} does not fit the backbone {_describe(model)}:\n{report.format(errors_only=True)}\n"
            f"expected {SWIN_EXPECTED} (set pretrained=PATH, e.g. --cfg-options pretrained=PATH)")
    return mapped, report


def load_swin_checkpoint(model: nn.Module, path: str, logger=None, what: str = "pretrained") -> KeyReport:
    """Load ``path`` into mmdet's ``SwinTransformer`` ``model`` and log the key report; any real
    error raises :class:`CheckpointMismatchError` before a single weight is copied."""
    mapped, report = _check(model, path, what)
    model.load_state_dict(mapped, strict=False)
    if logger is not None:
        logger.info(report.format())
    return report


def check_swin_checkpoint(backbone_cfg: Mapping[str, Any], path: str, what: str = "pretrained") -> KeyReport:
    """What :func:`load_swin_checkpoint` would do, with the file memory-mapped and nothing copied:
    the entry points' check before a run builds anything. (The backbone is built on the CPU: mmdet's
    Swin reads tensor values while it is built, which a ``meta``-device model cannot; Swin-T is
    28M parameters.)"""
    kwargs = {k: v for k, v in backbone_cfg.items() if k not in ("type", "_scope_", "init_cfg")}
    model = TimmSwinTransformer(**kwargs)
    return _check(model, path, what, mmap=True)[1]


@MODELS.register_module()
class TimmSwinTransformer(SwinTransformer):
    """mmdet's ``SwinTransformer`` (same arguments, same parameter names) whose
    ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` loads our fine-tuned Swin classifiers
    (timm keys) or the official release, with a key report (module docstring)."""

    def __init__(self, *args: Any, init_cfg: Optional[dict] = None, **kwargs: Any) -> None:
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained"
                                     or set(init_cfg) - {"type", "checkpoint"} or not init_cfg.get("checkpoint")):
            raise ConfigError(f"TimmSwinTransformer init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                              f"got {init_cfg!r}")
        for key in ("convert_weights", "pretrained"):
            if kwargs.get(key):
                raise ConfigError(f"TimmSwinTransformer: drop {key}= (it converts timm and official checkpoints "
                                  "itself); name the file in init_cfg=dict(type='Pretrained', checkpoint=PATH)")
        super().__init__(*args, init_cfg=None, **kwargs)
        self.init_cfg = init_cfg

    def init_weights(self) -> None:
        """Random init as mmdet's (truncated-normal linears, unit LayerNorms), then the checkpoint."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=0.02, bias=0.0)
            elif isinstance(m, nn.LayerNorm):
                constant_init(m, 1.0)
        if self.init_cfg is not None:
            load_swin_checkpoint(self, self.init_cfg["checkpoint"], logger=MMLogger.get_current_instance())
        self._is_init = True
