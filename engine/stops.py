"""Nothing lost when a run is stopped: one live run per directory, and clean stops on Ctrl-C or
pre-emption.

- :class:`RunLock`: ``run.lock`` in a run directory, an exclusive ``flock`` held for the life of the
  process (the kernel drops it when the process dies, so a crashed run never blocks the next one)
  with a JSON record of its holder (pid, host, start time, command), so a second run can say who
  holds the directory.
- :class:`StopSignals`: SIGINT / SIGTERM handlers. While the training loop runs (``defer(True)``)
  the first signal is only recorded: the loop finishes its optimizer step, writes a checkpoint of
  it and raises :class:`Stopped`; a second signal (or one outside the loop) stops at once
  (:class:`Interrupted`, a ``KeyboardInterrupt``).
- :class:`StepControl`: what every rank agrees on after each optimizer step (stop; write a timed
  checkpoint) through one small all-reduce on a gloo group, started asynchronously and read one
  step later, so a step never waits for it.
- :func:`run_child`: a training run started by a driver (study, evaluation) in its own session,
  with each signal the driver receives forwarded once, so the child stops cleanly and is not
  killed half-way through its checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import torch

from .distributed import DistInfo

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOCK_NAME = "run.lock"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
    return 128 + signum


class Stopped(Exception):
    """A run stopped cleanly on a signal (its state is saved); ``exit_code`` 130 / 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """A signal that stops at once: a second one, or one outside the training loop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory (a user error: exit 2)."""


# ---- one live run per directory ---------------------------------------------------------------
def _describe(rec: Dict[str, Any]) -> str:
    return (f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}"
            + (f": {rec['command']}" if rec.get("command") else ""))


def _read_record(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.loads(f.read() or "null")
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock of a run directory (``run.lock``), taken before the run writes anything.

    The file is never deleted (a deleted lock file can be locked again by a process that opened it
    before, while a new one is created beside it); released, it records ``released``. A record
    without ``released`` found when the lock is free belonged to a process that died: taken over
    with a notice. Where the file system has no ``flock`` (some network mounts), the record alone
    decides: a live process on this host, or any holder on another host, keeps the directory."""

    def __init__(self, directory: str, command: str = "", name: str = LOCK_NAME) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)   # another name: a second lock beside the run's (a driver's)
        self.command = command
        self._fd: Optional[int] = None
        self.notice = ""           # what acquiring found (a stale holder taken over), for the run's log

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunDirBusy` naming its holder."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(_read_record(self.path)) from None
                flock = False          # ENOLCK / EOPNOTSUPP: no file locks here, the record decides
            old = _read_record(self.path)
            if old is not None and not old.get("released"):
                same_host = old.get("host") == socket.gethostname()
                if not flock and (not same_host or _pid_alive(int(old.get("pid", -1)))):
                    raise self._busy(old, note=" (this file system has no file locks: if that run is gone, "
                                               f"delete {self.path})")
                self.notice = (f"took over {self.path} from a run that is gone ({_describe(old)}); its last "
                               "checkpoint is where this run continues")
            elif not flock:
                self.notice = f"file locks are not supported under {self.directory}: the lock is a plain record"
            self._write(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": self.command})
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _busy(self, rec: Optional[Dict[str, Any]], note: str = "") -> RunDirBusy:
        who = _describe(rec) if rec else "another process"
        return RunDirBusy(f"{self.directory} is in use by a live run ({who}){note}; one run per directory: wait for "
                          "it to finish, stop it (Ctrl-C saves its step; the same command then resumes), or choose "
                          "another train.output_dir")

    @staticmethod
    def _write(fd: int, rec: Dict[str, Any]) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            rec = _read_record(self.path) or {}
            self._write(self._fd, {**rec, "released": datetime.datetime.now().isoformat(timespec="seconds")})
        finally:
            os.close(self._fd)          # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @staticmethod
    def holder(directory: str, name: str = LOCK_NAME) -> Optional[str]:
        """Who holds ``directory`` now (a dry run's notice), or None; never takes the lock for long."""
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                rec = _read_record(path)
                return _describe(rec) if rec else "another process"
            return None
        finally:
            os.close(fd)


# ---- signals ----------------------------------------------------------------------------------
class StopSignals:
    """SIGINT / SIGTERM handling of a run (installed by :class:`engine.run.Run` in the main thread).

    Outside :meth:`defer` a signal raises :class:`Interrupted` at once. Inside it (the training
    loop) the first signal is recorded in ``signum`` and the loop asks :class:`StepControl` at the
    end of each step; a second one raises :class:`Interrupted`. The handler prints nothing: it may
    run in the middle of a write to the same stream."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._deferring = False
        self._previous: Dict[int, Any] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum)

    def defer(self, on: bool) -> None:
        """While on (the training loop), a first signal is only recorded."""
        self._deferring = on


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: the terminal's Ctrl-C reaches the whole process
    group, and a worker that died of it would break the step the main process is finishing."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StepControl:
    """Per optimizer step, the decisions every rank must take together: stop (a signal reached any
    rank) and write a timed checkpoint (``save_every_s`` by rank 0's clock, 0: never).

    One process decides at once. Several exchange ``[signal, save due]`` with a MAX all-reduce on a
    gloo group (host memory: no device synchronisation), started after step t and read after step
    t+1, so the collective overlaps a step; every rank reads the same result at the same step."""

    def __init__(self, signals: Optional[StopSignals], dist: DistInfo, save_every_s: float) -> None:
        self.signals, self.dist, self.save_every_s = signals, dist, save_every_s
        self._last_save = time.monotonic()
        self._group = None
        self._pending = None
        self._buf = torch.zeros(2, dtype=torch.int64)
        if dist.enabled:
            import torch.distributed as tdist

            self._group = tdist.new_group(backend="gloo")

    def begin(self) -> None:
        """The loop starts: from now on a first signal waits for the end of its step."""
        if self.signals is not None:
            self.signals.defer(True)

    def _local(self) -> List[int]:
        signum = (self.signals.signum if self.signals is not None else None) or 0
        due = int(self.dist.is_main and self.save_every_s > 0
                  and time.monotonic() - self._last_save >= self.save_every_s)
        return [signum, due]

    def poll(self) -> Tuple[Optional[int], bool]:
        """``(signal number or None, write a checkpoint now)``, the same on every rank."""
        local = self._local()
        if self._group is None:
            return local[0] or None, bool(local[1])
        import torch.distributed as tdist

        agreed = [0, 0]
        if self._pending is not None:
            self._pending.wait()
            agreed = self._buf.tolist()
        self._buf = torch.tensor(local, dtype=torch.int64)
        self._pending = tdist.all_reduce(self._buf, op=tdist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed[0] or None, bool(agreed[1])

    def saved(self) -> None:
        """A checkpoint was written (any reason): the timer starts again."""
        self._last_save = time.monotonic()

    def close(self) -> None:
        """The loop ends: signals stop at once again; the exchange in flight is finished (every rank
        calls this after the same number of polls)."""
        if self.signals is not None:
            self.signals.defer(False)
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        if self._group is not None:
            import torch.distributed as tdist

            tdist.destroy_process_group(self._group)
            self._group = None


# ---- runs started by a driver -----------------------------------------------------------------
def run_child(cmd: Sequence[str], log: TextIO, what: str) -> int:
    """Run ``cmd`` (a training run) in its own session with stdout and stderr to ``log``, forward
    every SIGINT / SIGTERM this process receives to it, wait for it and return its exit code.

    In its own session the terminal's Ctrl-C reaches the child once, through here (in the same
    process group it would get it twice: a second signal means "stop at once"). Raises
    :class:`Stopped` when the child stopped on a signal, or when a signal came and the child
    finished anyway (the driver must not start the next one); ``what`` names the child."""
    received: List[int] = []
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if main else {}
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    stopped_by = next((s for s in STOP_SIGNALS if rc in (exit_code(s), -s)), None)
    if stopped_by is not None or received:
        signum = stopped_by or received[0]
        state = (f"it stopped on {signal_name(signum)} and saved its last step" if stopped_by is not None
                 else f"it finished before {signal_name(received[0])} took effect")
        raise Stopped(f"stopped during {what}: {state}; run the same command to continue", exit_code(signum))
    return rc

