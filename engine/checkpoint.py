"""Checkpoint files: atomic writes, ``checkpoint-latest.pth``, keep-last-K, safe loading, and a
background writer so that saving stalls training only for the copy to host memory."""
from __future__ import annotations

import glob
import os
import re
import threading
from typing import Any, Callable, Dict, List, Optional

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


class HostCopy:
    """Copies a state dict to host memory: CPU tensors by value; CUDA tensors into page-locked
    buffers (kept in ``pool`` and reused by the next checkpoint of the same shapes) with
    asynchronous copies on a side stream, so the training thread only queues them. The training
    stream waits for the copies on the device (not the host) before it changes the weights again;
    :meth:`wait` (on the writer thread) blocks until they landed."""

    def __init__(self, pool: Optional[List[torch.Tensor]] = None) -> None:
        self.pool = pool if pool is not None else []
        self._used = 0
        self._event = None
        self._stream = None

    def snapshot(self, obj: Any) -> Any:
        out = self._copy(obj)
        if self._stream is not None:
            self._event = torch.cuda.Event()
            self._event.record(self._stream)
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        return out

    def _copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type != "cuda":
                return t.to("cpu", copy=True)
            if self._stream is None:
                self._stream = torch.cuda.Stream(t.device)
                self._stream.wait_stream(torch.cuda.current_stream(t.device))   # the values as of now
            buf = self.pool[self._used] if self._used < len(self.pool) else None
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                if self._used < len(self.pool):
                    self.pool[self._used] = buf
                else:
                    self.pool.append(buf)
            self._used += 1
            with torch.cuda.stream(self._stream):
                buf.copy_(t, non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v) for v in obj)
        return obj

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time.

    :meth:`submit` queues the copy of the state to host memory (:class:`HostCopy`: page-locked
    buffers, reused, for device tensors) and returns; the file is written, linked as latest and
    pruned while training continues. A new submit first waits for the previous write; :meth:`wait`
    re-raises a failed write, so an error never goes unnoticed, only later.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._pool: List[torch.Tensor] = []

    def submit(self, state: Dict[str, Any], write: Callable[[Dict[str, Any]], Any]) -> None:
        """Snapshot ``state`` now; ``write(snapshot)`` on the writer thread."""
        self.wait()                      # the previous write is done: its page-locked buffers are free again
        copy = HostCopy(self._pool)
        state = copy.snapshot(state)

        def run() -> None:
            try:
                copy.wait()
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


class CheckpointError(ValueError):
    """A checkpoint file a user named that cannot be used: missing, unreadable, or not what the
    command needs (the message names the file, what was found and what is expected)."""


CHECKPOINT_EXPECTED = ("a file written by torch.save: ours (train.output_dir/checkpoints/*.pth, encoder.pth) or an "
                       "official MAE / timm state dict")
_ZIP_MAGIC = b"PK\x03\x04"      # torch.save's format since torch 1.6
_PICKLE_PROTOCOLS = range(2, 6)  # the legacy format: a pickle (protocol 2+) of torch's magic number first


def _describe_start(head: bytes) -> str:
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with bytes {head[:8].hex(' ')}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting with {first!r}" if first else "a file of white space"


def check_checkpoint_file(path: str, what: str = "checkpoint", expected: str = CHECKPOINT_EXPECTED) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a file torch.save could have written (a zip
    archive or a legacy pickle), reading its first bytes only: cheap enough to run on every file a
    command will read before anything expensive starts. ``what``: the setting the path came from."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist; expected {expected}")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a folder; expected {expected}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
        return
    raise CheckpointError(f"{what} {path!r} is not a PyTorch checkpoint: it is {_describe_start(head)} "
                          f"({os.path.getsize(path)} bytes); expected {expected}")


def load_checkpoint(path: str, what: str = "checkpoint", expected: str = CHECKPOINT_EXPECTED) -> Dict[str, Any]:
    """Load any checkpoint on the CPU with ``weights_only=True`` (no arbitrary pickles): our resume
    files hold only tensors and primitive types (optimizer, scaler and RNG state included).
    ``what`` names the setting the path came from in the error (e.g. ``model.checkpoint``)."""
    check_checkpoint_file(path, what, expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, which would execute the file's pickled code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first or "weights_only" in str(e):
            why = ("it holds Python objects other than tensors and plain values; this toolkit loads "
                   "checkpoints with weights_only=True and never unpickles arbitrary code")
        else:
            why = f"{type(e).__name__}: {first}"
        raise CheckpointError(f"{what} {path!r} is not a readable PyTorch checkpoint ({why}); expected "
                              f"{expected}") from None
