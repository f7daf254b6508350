"""mmengine training checkpoints under ``torch.load(weights_only=True)`` (torch >= 2.6 default).

mmengine 0.10 checkpoints hold its log history (``message_hub``): ``HistoryBuffer`` objects with
numpy arrays and bound methods (pickled as ``getattr(buffer, 'min')``), which the weights-only
unpickler refuses. Rather than ``weights_only=False`` (arbitrary code on load),
:func:`mmengine_checkpoint_globals` allowlists exactly those types while a block loads checkpoints:
``HistoryBuffer``, numpy arrays and dtypes, and, in place of the builtin ``getattr``, a function that
only returns a ``HistoryBuffer``'s registered statistic methods. Everything else is still refused.

The bottom of the package's checkpoint modules: :mod:`detection.checkpoint_io` (backbone files) and
:mod:`detection.runner` (detector checkpoints, resume) both load under it.
"""
from __future__ import annotations

import contextlib
import pickle
from typing import Any, Callable, Iterator, List, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]

_DTYPE_CHARS = "?bBhHiIlLqQefdgFDG"


def history_buffer_method(obj: Any, name: str) -> Callable:
    """The ``getattr`` a checkpoint may call: a statistic method (min / max / mean / current or
    one registered with ``HistoryBuffer.register_statistics``) of ``HistoryBuffer`` or of one of
    its instances, nothing else."""
    owner = obj is HistoryBuffer or isinstance(obj, HistoryBuffer)
    allowed = {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}
    if owner and isinstance(name, str) and name in allowed:
        return getattr(obj, name)
    what = obj.__name__ if isinstance(obj, type) else f"a {type(obj).__name__}"
    raise pickle.UnpicklingError(f"checkpoint asks for attribute {name!r} of {what}; only "
                                 "HistoryBuffer statistic methods are allowed")


def _safe_globals() -> List[Union[Callable, tuple]]:
    dtypes = sorted({type(np.dtype(c)) for c in _DTYPE_CHARS}, key=lambda t: t.__name__)
    return [HistoryBuffer, np.ndarray, np.dtype, _np_multiarray._reconstruct, _np_multiarray.scalar, *dtypes,
            (history_buffer_method, "builtins.getattr")]


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` reads mmengine training checkpoints."""
    with torch.serialization.safe_globals(_safe_globals()):
        yield
