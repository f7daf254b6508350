"""Mixed precision that follows the device: the full configs ask for ``AmpOptimWrapper``, which
mmengine only builds on CUDA (an assertion otherwise), so a CPU smoke run of a full config needs
the wrapper switched to fp32, and ``optim_wrapper.type=OptimWrapper`` alone then fails on the AMP
wrapper's own ``loss_scale`` argument.

:func:`resolve_amp` applies the top-level config key ``amp`` (default ``'auto'``):

- ``'auto'``: an ``AmpOptimWrapper`` stays on a machine with CUDA and becomes ``OptimWrapper``
  (fp32, AMP-only arguments dropped) on one without, with a notice saying so; an fp32 config
  stays fp32;
- ``True``: ``AmpOptimWrapper`` (dynamic loss scale unless the config sets one); a machine
  without CUDA is a :class:`engine.config.ConfigError`;
- ``False``: ``OptimWrapper`` without the AMP-only arguments.

``tools/det_train.py --amp / --no-amp`` set it; :class:`detection.runner.DetRunner` (the
configs' ``runner_type``) applies it too, so mmdet's own ``tools/train.py`` takes
``--cfg-options amp=False`` (or nothing: ``'auto'``) and logs the same notice.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from engine.config import ConfigError

AMP_VALUES = ("auto", True, False)
AMP_ONLY_KEYS = ("loss_scale", "dtype", "use_fsdp")   # AmpOptimWrapper's arguments OptimWrapper lacks
SWITCHABLE = ("OptimWrapper", "AmpOptimWrapper")


def amp_setting(cfg: Any) -> Any:
    """The config's ``amp`` key (``'auto'`` when absent), checked."""
    amp = cfg.get("amp", "auto")
    if isinstance(amp, str) and amp.lower() in ("true", "false", "auto"):
        amp = {"true": True, "false": False, "auto": "auto"}[amp.lower()]
    if amp not in AMP_VALUES or (amp == 1 and amp is not True) or (amp == 0 and amp is not False):
        raise ConfigError(f"amp={amp!r} is not a choice: 'auto' (mixed precision where CUDA is available), "
                          "True (always; needs CUDA) or False (fp32)")
    return amp


def resolve_amp(cfg: Any, cuda: Optional[bool] = None) -> Optional[str]:
    """Make ``cfg.optim_wrapper`` what ``cfg.amp`` asks for on this machine (``cuda``: whether a
    CUDA device is usable; default ``torch.cuda.is_available()``). Returns the notice to log when
    the config's AMP wrapper was switched to fp32 (or AMP-only arguments dropped), else ``None``.
    Idempotent: a second call changes nothing and returns ``None``."""
    amp = amp_setting(cfg)
    cfg["amp"] = amp
    wrapper = cfg.get("optim_wrapper")
    if not isinstance(wrapper, dict):
        return None
    kind = wrapper.get("type", "OptimWrapper")
    if kind not in SWITCHABLE:
        if amp is not True and amp is not False:
            return None
        raise ConfigError(f"amp={amp} switches optim_wrapper.type between OptimWrapper and AmpOptimWrapper; this "
                          f"config uses {kind!r} (set optim_wrapper.type yourself, and leave amp='auto')")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if amp is True:
        if not cuda:
            raise ConfigError("amp=True (--amp) needs a CUDA device and none is available; on a CPU leave amp='auto' "
                              "(fp32 there) or pass --no-amp / --cfg-options amp=False")
        wrapper["type"] = "AmpOptimWrapper"
        wrapper.setdefault("loss_scale", "dynamic")
        return None
    to_fp32 = amp is False or (kind == "AmpOptimWrapper" and not cuda)
    if not to_fp32 and kind == "AmpOptimWrapper":
        return None
    dropped: List[str] = [k for k in AMP_ONLY_KEYS if k in wrapper]
    if kind == "OptimWrapper" and not dropped:
        return None
    wrapper["type"] = "OptimWrapper"
    for k in dropped:
        wrapper.pop(k)
    gone = f" (dropped {', '.join(dropped)})" if dropped else ""
    if kind == "AmpOptimWrapper" and amp == "auto":
        return (f"AMP: no CUDA device, so this run trains in fp32 with OptimWrapper instead of the config's "
                f"AmpOptimWrapper{gone}; amp='auto' follows the device (--amp / amp=True insists on mixed "
                "precision, --no-amp / amp=False always trains in fp32)")
    if kind == "AmpOptimWrapper":
        return f"AMP off (amp=False): fp32 with OptimWrapper instead of the config's AmpOptimWrapper{gone}"
    return f"optim_wrapper.type=OptimWrapper: fp32; dropped {', '.join(dropped)}, which only AmpOptimWrapper takes"
