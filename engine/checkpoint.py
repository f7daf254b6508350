"""Checkpoint files: atomic writes, ``checkpoint-latest.pth``, keep-last-K, safe loading."""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, Optional

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
