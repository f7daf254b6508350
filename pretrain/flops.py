"""The MAE's training FLOPs per stage size: the model builder :mod:`engine.flops` counts.

The FLOP counter lives in the engine and knows no task; a task hands it a :data:`engine.flops.Build`
(input size -> the model prepared for it and its training loss). This is pretraining's.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch.nn as nn

from engine.flops import Build, LossFn

from .models_mae import create_mae


def mae_builder(model_cfg: Any) -> Build:
    """A :data:`Build` for a pretraining run's MAE (``pretrain.config.ModelConfig``): the model at the
    final size with its target, position tables prepared for the stage size, its loss with the
    run's mask ratio (the encoder sees the unmasked tokens, the decoder all)."""
    mask = model_cfg.mask_ratio

    def build(size: int) -> Tuple[nn.Module, LossFn]:
        model = create_mae(model_cfg.arch, **model_cfg.overrides())
        model.prepare_input_size(size)
        return model, lambda m, x: m(x, mask_ratio=mask)[0]

    return build
