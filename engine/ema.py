"""Exponential moving average of a model's weights (timm's ``ModelEmaV3``, kept in float32).

Why: the official EfficientTrain++ ConvNeXt / CSWin recipes train with timm's ``ModelEma``: after
every optimizer step ``ema = decay * ema + (1 - decay) * model`` over the whole state dict
(parameters and buffers), and the EMA weights are evaluated and checkpointed beside the model's.
AutoProg / MoGrow's momentum network is the same update (``m = 0.998`` every step), so this one
class serves both.

``ModelEmaV3`` with a constant decay (no warmup, ``update(model)`` without a step) computes that
formula as ``ema.lerp_(model, 1 - decay)`` with foreach kernels (a handful of launches per step,
no host sync). Two differences from the official ``ModelEma``, neither of which changes what is
averaged: the lerp form rounds differently (float32 ulp level), and integer buffers (BatchNorm's
``num_batches_tracked``, unused when BN has a momentum) are copied instead of being put through
the float formula and truncated back to integers.

``warmup=True`` (MoGrow's momentum network) uses the decay ``min(decay, (1 + t) / (10 + t))`` at
the update after ``t`` earlier ones (TensorFlow's ``ExponentialMovingAverage(num_updates)``
warm-up): with a constant 0.998 an EMA of a short run stays mostly the random initialisation
(0.998^45 = 0.91 after 45 steps), so a network grown from it would lose what was learnt. The
warm-up reaches the constant after (10 m - 1) / (1 - m) updates (4490 for m = 0.998).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None)
        if inner is None:
            return model
        model = inner


class WeightEma:
    """A float32 copy of ``model`` on the model's device, averaged after every optimizer step.

    The copy is in eval mode and has no gradients. Its state dict is the plain module's (no
    wrapper prefix), so a checkpoint's EMA loads into the bare model.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0            # updates so far (t of the warm-up; checkpointed by the owner when warmup)
        self._ema = ModelEmaV3(unwrap(model), decay=self.decay, dtype=torch.float32, foreach=True)
        self.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (evaluate it, save it, re-shape it)."""
        return self._ema.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for every floating-point entry of the state
        dict (parameters and buffers); integer buffers are copied. ``decay`` is :meth:`decay_at`."""
        self._ema.decay = self.decay_at(self.updates)
        self._ema.update(unwrap(model))
        self.updates += 1

    def decay_at(self, t: int) -> float:
        """The decay of the update after ``t`` earlier ones (see the module docstring)."""
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the EMA equal to ``model`` (same shapes required)."""
        self._ema.set(unwrap(model))

    def reshape(self, prepare: Callable[[nn.Module], Any], model: nn.Module) -> Any:
        """Apply the parameter surgery ``prepare`` that ``model`` just went through (e.g. a
        stage-size change replacing parameters by interpolated ones) to the EMA copy, then check
        that both have the same state-dict entries and shapes again (the update pairs them up in
        order). Returns what ``prepare`` returned."""
        out = prepare(self.module)
        self.check_matches(model)
        return out

    def check_matches(self, model: nn.Module) -> None:
        ours, theirs = self.module.state_dict(), unwrap(model).state_dict()
        bad = [k for k in set(ours) | set(theirs)
               if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape]
        if bad:
            raise RuntimeError(f"the weight EMA no longer matches the model (entries or shapes differ: "
                               f"{sorted(bad)[:5]}); it must go through the same parameter surgery")

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict: an EMA that does not fit the model is an error, never partly loaded."""
        self.module.load_state_dict(state, strict=True)
