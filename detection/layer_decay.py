"""Layer-wise learning-rate decay for the ViT detector, on the toolkit's one implementation.

The groups come from :func:`engine.optim.param_groups_layer_decay`, as in fine-tuning: layer 0
is the patch / position embedding, ``blocks.i`` is layer ``i + 1``, and everything else (the
pyramid neck, the detection heads) is the top layer ``depth + 1`` with scale 1. A group's LR is
``base_lr * layer_decay ** (depth + 1 - layer_id)``; mmengine's schedulers multiply each group's
own initial LR, so the scales hold through warm-up and the LR steps. Which parameters skip weight
decay: the toolkit's rule (1-D tensors, biases, position embeddings) or, with
``weight_decay_rule='vitdet'``, ViTDet's (:func:`vitdet_param_groups`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch.nn as nn
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS

from engine.optim import describe_groups, param_groups_layer_decay
from engine.config import ConfigError

DEFAULT_NO_DECAY = ("cls_token", "pos_embed", "dist_token", "reg_token")
WEIGHT_DECAY_RULES = ("default", "vitdet")


def vitdet_param_groups(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """Groups as ViTDet's optimizer (detectron2's ``get_default_optimizer_params`` with
    ``weight_decay_norm=0`` and a ``pos_embed`` override, LR scales from ``get_vit_lr_decay_rate``):
    no weight decay for the parameters of ``torch.nn.LayerNorm`` modules (the ViT's norms) and for
    ``pos_embed``; everything else decays, biases and relative-position tables included, and so do
    the channel LayerNorms (``LN2d``) of the pyramid and heads, which in detectron2 are its own
    ``LayerNorm`` class, not torch's. Same keys as :func:`engine.optim.param_groups_layer_decay`."""
    norm_params = {f"{mod}.{name}" if mod else name
                   for mod, m in model.named_modules() if type(m) is nn.LayerNorm
                   for name, _ in m.named_parameters(recurse=False)}
    return param_groups_layer_decay(model.named_parameters(), depth, weight_decay, layer_decay,
                                    no_decay=lambda name, p: name in norm_params or name.split(".")[-1] == "pos_embed")


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg``: ``layer_decay`` (required, in (0, 1]; ViTDet: 0.7 ViT-B, 0.8 ViT-L, 0.9
    ViT-H), ``depth`` (default: ``model.backbone.depth``), ``weight_decay_rule``: ``'default'``
    (no weight decay for 1-D tensors, biases and ``no_decay_names``: parameter names, full or last
    component) or ``'vitdet'`` (ViTDet's: only torch LayerNorms and ``pos_embed``, see
    :func:`vitdet_param_groups`)."""

    ALLOWED_KEYS = ("layer_decay", "depth", "no_decay_names", "weight_decay_rule")

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        cfg = dict(paramwise_cfg or {})
        unknown = sorted(set(cfg) - set(self.ALLOWED_KEYS))
        if unknown:
            raise ConfigError(f"ViTLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {unknown}; "
                             f"allowed: {', '.join(self.ALLOWED_KEYS)}")
        if "layer_decay" not in cfg:
            raise ConfigError("ViTLayerDecayOptimizerConstructor needs paramwise_cfg=dict(layer_decay=...), "
                             "e.g. 0.7 for ViT-B")
        super().__init__(optim_wrapper_cfg, None)
        if self.base_lr is None or self.base_wd is None:
            raise ConfigError("the optimizer config must set lr and weight_decay explicitly for layer decay, got "
                             f"{self.optimizer_cfg}")
        self.layer_decay = float(cfg["layer_decay"])
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"paramwise_cfg.layer_decay must be in (0, 1], got {self.layer_decay}")
        self.depth = cfg.get("depth")
        self.no_decay_names = tuple(cfg.get("no_decay_names", DEFAULT_NO_DECAY))
        self.weight_decay_rule = cfg.get("weight_decay_rule", "default")
        if self.weight_decay_rule not in WEIGHT_DECAY_RULES:
            raise ConfigError(f"paramwise_cfg.weight_decay_rule {self.weight_decay_rule!r} is unknown; allowed: "
                              f"{', '.join(WEIGHT_DECAY_RULES)}")
        if self.weight_decay_rule == "vitdet" and "no_decay_names" in cfg:
            raise ConfigError("paramwise_cfg.no_decay_names applies to weight_decay_rule='default' only; "
                              "'vitdet' fixes its own (torch LayerNorms and pos_embed)")

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Optimizer parameter groups with ``lr``, ``weight_decay``, ``lr_scale`` and ``layer_id``."""
        depth = self.depth
        if depth is None:
            depth = getattr(getattr(model, "backbone", None), "depth", None)
            if depth is None:
                raise ConfigError("cannot infer the ViT depth: the model has no backbone.depth; set "
                                 "paramwise_cfg=dict(depth=...)")
        if self.weight_decay_rule == "vitdet":
            groups = vitdet_param_groups(model, int(depth), self.base_wd, self.layer_decay)
        else:
            groups = param_groups_layer_decay(model.named_parameters(), int(depth), self.base_wd, self.layer_decay,
                                              self.no_decay_names)
        for g in groups:   # only the backbone has layers below the top: a neck / head name must not match
            stray = [n for n in g["names"] if not n.startswith("backbone.")]
            if stray and g["layer_id"] != depth + 1:
                raise ValueError(f"parameters outside the backbone were given ViT layer {g['layer_id']}: "
                                 f"{stray[:3]} (their names look like ViT blocks / embeddings)")
        if get_rank() == 0:
            print_log(f"layer-wise lr decay {self.layer_decay} over depth {depth}, base lr {self.base_lr:g}, "
                      f"weight decay {self.base_wd:g} ({self.weight_decay_rule} rule); {len(groups)} parameter "
                      f"groups:\n{describe_groups(groups)}",
                      logger="current")
        return [{"params": g["params"], "lr": self.base_lr * g["lr_scale"], "weight_decay": g["weight_decay"],
                 "lr_scale": g["lr_scale"], "layer_id": g["layer_id"]} for g in groups]

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, "module"):
            model = model.module
        optimizer_cfg = dict(self.optimizer_cfg)
        optimizer_cfg["params"] = self.param_groups(model)
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
