"""Resume mmengine training runs under ``torch.load(weights_only=True)`` (torch >= 2.6 default).

mmengine 0.10 checkpoints hold its log history (``message_hub``): ``HistoryBuffer`` objects with
numpy arrays and bound methods (pickled as ``getattr(buffer, 'min')``), which the weights-only
unpickler refuses, so ``--resume`` and loading a trained detector fail (a known mmengine issue).
Rather than switching to ``weights_only=False`` (arbitrary code on load), :class:`DetRunner`
allowlists exactly those types while it loads checkpoints: ``HistoryBuffer``, numpy arrays and
dtypes, and, in place of the builtin ``getattr``, a function that only returns a ``HistoryBuffer``'s
registered statistic methods (:func:`detection.safe_load.mmengine_checkpoint_globals`). Everything
else in a checkpoint is still refused.

A local checkpoint file that cannot be used (missing, not a checkpoint, no training state for a
resume, none of the detector's weights) raises :class:`engine.checkpoint.CheckpointError` naming
the file and the setting it came from, a user error for the command lines, instead of the
unpickler's or mmengine's exception; :func:`read_detector_checkpoint` is also the entry points'
up-front check.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from engine.checkpoint import CheckpointError

from .checkpoint_io import read_checkpoint
from .safe_load import mmengine_checkpoint_globals

DETECTOR_EXPECTED = ("a detector checkpoint written by tools/det_train.py (WORK_DIR/epoch_N.pth or iter_N.pth); "
                     "backbone weights (MAE / timm files) go in `pretrained` instead")


def _strip(key: str) -> str:
    return key[7:] if key.startswith("module.") else key


def read_detector_checkpoint(path: str, what: str, resume: bool = False, mmap: bool = False,
                             module_names: Optional[Sequence[str]] = None,
                             model_keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A detector checkpoint (``load_from``, ``--resume``, det_test.py's CKPT) loaded with
    ``weights_only=True``, or :class:`CheckpointError` naming ``what`` (the setting the path came
    from): not a checkpoint, no ``meta.epoch`` / ``meta.iter`` / ``state_dict`` for a resume, or
    no weight of the detector: no key under ``module_names`` (the config's ``model`` sub-modules,
    for a check before the model is built) or none of ``model_keys`` (the built model's)."""
    ckpt = read_checkpoint(path, what, DETECTOR_EXPECTED, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path!r} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                              f"expected {DETECTOR_EXPECTED}")
    sd = ckpt.get("state_dict", ckpt)
    top = sorted(map(str, ckpt))[:8]
    if resume:
        meta = ckpt.get("meta")
        lacks = [k for k, ok in (("state_dict", isinstance(ckpt.get("state_dict"), dict)),
                                 ("meta.epoch", isinstance(meta, dict) and "epoch" in meta),
                                 ("meta.iter", isinstance(meta, dict) and "iter" in meta)) if not ok]
        if lacks:
            raise CheckpointError(f"{what} {path!r} holds no training state to resume: it lacks "
                                  f"{', '.join(lacks)} (top-level keys: {top}); expected {DETECTOR_EXPECTED}")
    tensors = [_strip(k) for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)] \
        if isinstance(sd, dict) else []
    if not tensors:
        raise CheckpointError(f"{what} {path!r} holds no weights (top-level keys: {top}); expected {DETECTOR_EXPECTED}")
    if module_names is not None:
        prefixes = tuple(f"{m}." for m in module_names)
        if not any(k.startswith(prefixes) for k in tensors):
            raise CheckpointError(f"{what} {path!r} holds none of the detector's weights: its {len(tensors)} tensor(s) "
                                  f"(e.g. {', '.join(tensors[:3])}) are under none of the config's model parts "
                                  f"({', '.join(module_names)}); expected {DETECTOR_EXPECTED}")
    if model_keys is not None and not set(tensors) & set(model_keys):
        raise CheckpointError(f"{what} {path!r} holds none of the detector's weights: none of its {len(tensors)} "
                              f"tensor(s) (e.g. {', '.join(tensors[:3])}) is a parameter of the model; "
                              f"expected {DETECTOR_EXPECTED}")
    return ckpt


@RUNNERS.register_module()
class DetRunner(Runner):
    """mmengine ``Runner`` whose checkpoint loading (``--resume``, ``load_from``, testing a trained
    detector) reads mmengine checkpoints with ``weights_only=True`` (:func:`mmengine_checkpoint_globals`)
    and turns a local file it cannot use into a :class:`CheckpointError` (see
    :func:`read_detector_checkpoint`); ``checkpoint_label`` names the setting in that message (the
    entry points set it: ``--resume``, ``checkpoint``; default ``resume`` / ``load_from``).
    Configs select it with ``runner_type = 'DetRunner'``, so mmdet's own tools/train.py uses it too."""

    checkpoint_label: Optional[str] = None
    _resuming = False

    @classmethod
    def from_cfg(cls, cfg: Any) -> "DetRunner":
        """As mmengine's, after re-applying a changed ``data_root`` / ``pretrained`` /
        ``image_size`` to the fields derived from them (:func:`detection.user_settings.rebind_from_file`:
        mmdet's own ``tools/train.py`` / ``test.py`` merge ``--cfg-options`` literally), making the
        optimizer wrapper follow ``amp`` and the device (:func:`detection.amp.resolve_amp`: an
        ``AmpOptimWrapper`` trains in fp32 on a machine without CUDA, with a logged notice) and
        deriving what the config leaves to its files (:func:`detection.custom.resolve_derived`) and
        checking the backbone against the padded square
        (:func:`detection.user_settings.check_model_config`)."""
        from .amp import resolve_amp
        from .custom import resolve_derived
        from .user_settings import check_model_config, describe, rebind_from_file

        cfg = copy.deepcopy(cfg)
        changed = rebind_from_file(cfg)
        note = describe(changed)
        derived = resolve_derived(cfg)
        amp_notice = resolve_amp(cfg)
        check_model_config(cfg)
        runner = super().from_cfg(cfg)
        if note:
            runner.logger.info(note)
        for line in derived:
            runner.logger.info(f"derived: {line}")
        if any(path.endswith("init_cfg") for path in changed):    # pretrained=None (our entry points say it too)
            runner.logger.info("pretrained=None: the backbone starts from random weights (no checkpoint is loaded)")
        runner.amp_notice = amp_notice          # logged when training starts (not for a test-only run)
        return runner

    amp_notice: Optional[str] = None

    def train(self) -> Any:
        """As mmengine's, after logging the AMP notice of :meth:`from_cfg` (once)."""
        if self.amp_notice:
            self.logger.warning(self.amp_notice)
            self.amp_notice = None
        return super().train()

    def resume(self, filename: str, *args: Any, **kwargs: Any) -> None:
        self._resuming = True
        try:
            return super().resume(filename, *args, **kwargs)
        finally:
            self._resuming = False

    def load_checkpoint(self, filename: str, map_location: Union[str, Callable] = "cpu", strict: bool = False,
                        revise_keys: list = [(r"^module.", "")]) -> dict:  # noqa: B006 (mmengine's signature)
        """As mmengine's, with local files read by :func:`read_detector_checkpoint` (on the CPU:
        loading the state into the model and optimizer moves it to their device)."""
        if "://" in str(filename):   # URLs, open-mmlab://, ...: mmengine's loaders
            with mmengine_checkpoint_globals():
                return super().load_checkpoint(filename, map_location, strict, revise_keys)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        what = self.checkpoint_label or ("resume" if self._resuming else "load_from")
        checkpoint = read_detector_checkpoint(filename, what, resume=self._resuming,
                                              model_keys=list(model.state_dict()))
        # the rest of mmengine's Runner.load_checkpoint (0.10)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint
