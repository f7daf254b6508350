"""The classifier's training FLOPs per stage size: the model builder :mod:`engine.flops` counts.

The FLOP counter lives in the engine and knows no task; a task hands it a :data:`engine.flops.Build`
(input size -> the model prepared for it and its training loss). This is fine-tuning's and
supervised training's.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch.nn as nn

from engine.flops import Build, FlopsError, LossFn, classifier_loss

from .models import check_resizable, create_classifier
from .resize import handles, prepare_for_size


def classifier_resize(model_cfg: Any) -> str:
    """How a supervised run prepares a Swin for a stage size: ``model.resize`` when the config has
    it, else ``official`` (the official window rule)."""
    return getattr(model_cfg, "resize", None) or "official"


def classifier_builder(model_cfg: Any) -> Build:
    """A :data:`Build` for a fine-tuning / supervised run's classifier (``finetune.config.ClassifierConfig``,
    name and img_size resolved): the run's own classifier prepared for each size as the training
    task prepares it: :func:`finetune.resize.prepare_for_size` for Swin / ViT with ``resize: official``
    (Swin windows scaled with the input), ``check_resizable`` otherwise."""

    def build(size: int) -> Tuple[nn.Module, LossFn]:
        model = create_classifier(model_cfg, dynamic_size=True)
        if classifier_resize(model_cfg) == "official" and handles(model):
            prepare_for_size(model, size)        # the very preparation the training task applies per stage
            return model, classifier_loss
        ok, why = check_resizable(model, size)
        if not ok:
            raise FlopsError(f"{model_cfg.name} cannot train at input size {size}: {why}")
        return model, classifier_loss

    return build
