"""Checkpoint files: atomic writes, ``checkpoint-latest.pth``, keep-last-K, safe loading, and a
background writer so that saving stalls training only for the copy to host memory."""
from __future__ import annotations

import glob
import os
import re
import threading
from typing import Any, Callable, Dict, Optional

import torch

LATEST = "checkpoint-latest.pth"
_STEP_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``:
    a crash leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj: Any, path: str) -> None:
    """Write a JSON file atomically (temporary file + rename)."""
    import json

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_checkpoint(state: Dict[str, Any], folder: str, step: int, keep_last: int) -> str:
    """Save ``checkpoint-{step}.pth`` and ``checkpoint-latest.pth``; prune to the newest ``keep_last``."""
    path = os.path.join(folder, f"checkpoint-{step:08d}.pth")
    atomic_save(state, path)
    tmp_link = os.path.join(folder, f".{LATEST}.tmp{os.getpid()}")
    if os.path.exists(tmp_link):
        os.remove(tmp_link)
    try:
        os.link(path, tmp_link)          # latest is a hard link: no second copy on disk
    except OSError:
        atomic_save(state, tmp_link)
    os.replace(tmp_link, os.path.join(folder, LATEST))
    if keep_last > 0:
        numbered = sorted(p for p in glob.glob(os.path.join(folder, "checkpoint-*.pth")) if _STEP_RE.search(p))
        for old in numbered[:-keep_last]:
            os.remove(old)
    return path


def snapshot(obj: Any) -> Any:
    """A deep copy of a state dict's tensors in host memory (training may change the originals
    in place while a background thread writes the copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time.

    :meth:`submit` snapshots the state to host memory (the only part training waits for) and
    returns; the file is written, linked as latest and pruned while training continues. A new
    submit first waits for the previous write; :meth:`wait` re-raises a failed write, so an
    error never goes unnoticed, only later.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, state: Dict[str, Any], write: Callable[[Dict[str, Any]], Any]) -> None:
        """Snapshot ``state`` now; ``write(snapshot)`` on the writer thread."""
        self.wait()
        state = snapshot(state)

        def run() -> None:
            try:
                write(state)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending write is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def find_latest(folder: str) -> Optional[str]:
    path = os.path.join(folder, LATEST)
    return path if os.path.isfile(path) else None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load any checkpoint on the CPU with ``weights_only=True`` (no arbitrary pickles): our resume
    files hold only tensors and primitive types (optimizer, scaler and RNG state included)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a clearer message than pickle's
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from None
