"""Replay buffer of EfficientTrain++ (for hosts whose CPUs cannot feed the accelerators).

Official semantics: the loader yields 1/rt of the training batch; each loader batch is split into
``chunks_per_batch`` chunks kept on the CPU (FIFO, evicted one loader batch at a time); each step
returns the fresh batch followed by (rt - 1) * chunks_per_batch chunks drawn uniformly with
replacement from the buffer (the fresh chunks included). The buffer is emptied at stage changes.
The official code stores the stage-size model input in float16; so does a training loop that
passes ``store_dtypes=(torch.float16, ...)``.

On a GPU the fresh batch is copied into pinned host memory without blocking and replayed chunks
are copied back the same way: both copies are queued on the current stream, which orders them,
so a step never waits for the host (the host never reads the stored pixels).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch


def buffer_bytes(capacity: int, loader_batch: int, sample_shape: Sequence[int], bytes_per_element: int = 2) -> int:
    """Memory a full buffer holds per process: ``capacity`` loader batches of ``loader_batch``
    samples of ``sample_shape`` (e.g. (3, 96, 96) in float16, as the official code stores them)."""
    n = 1
    for d in sample_shape:
        n *= int(d)
    return int(capacity) * int(loader_batch) * n * int(bytes_per_element)


def image_sample_bytes(size: int) -> int:
    """A stored sample at input ``size``: a 3 x size x size float16 image (the official storage)."""
    return 3 * size * size * 2


def available_host_memory() -> Optional[int]:
    """Bytes of host memory available to new allocations (Linux ``MemAvailable``; None if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def replay_memory(plan: Any, world_size: int, sample_bytes: Callable[[int], int] = image_sample_bytes) -> Dict[int, int]:
    """Bytes a full buffer takes per process in every replay stage of ``plan`` (stage index ->
    bytes): ``replay_buffer`` loader batches of this process's share of the loader batch."""
    return {ps.index: int(ps.stage.replay_buffer) * (ps.loader_batch_size // world_size) * int(sample_bytes(ps.stage.size))
            for ps in plan.stages if ps.stage.replay_times > 1}


def check_replay_memory(plan: Any, world_size: int, processes_per_host: int,
                        sample_bytes: Callable[[int], int] = image_sample_bytes,
                        available: Optional[int] = None) -> Dict[int, int]:
    """:func:`replay_memory`, raising :class:`CurriculumError` when the largest stage's buffers of
    the ``processes_per_host`` processes sharing a host exceed the host memory available now
    (``available``, default :func:`available_host_memory`; unknown: not checked)."""
    from .curriculum import CurriculumError

    need = replay_memory(plan, world_size, sample_bytes)
    available = available_host_memory() if available is None else available
    if need and available is not None:
        index = max(need, key=need.get)
        host = need[index] * processes_per_host
        if host > available:
            ps = plan.stages[index]
            raise CurriculumError(
                f"curriculum stage {index} (size {ps.stage.size}): its replay buffer ({ps.stage.replay_buffer} loader "
                f"batches of {ps.loader_batch_size // world_size} samples per process) needs {need[index] / 2 ** 30:.2f} GiB "
                f"per process, {host / 2 ** 30:.2f} GiB for the {processes_per_host} process(es) of this host, and "
                f"{available / 2 ** 30:.2f} GiB is available; lower that stage's replay_buffer (the official DeiT-S stage 0 "
                f"holds 12.7 GiB per process, 101 GiB on an 8-GPU host), or use a curriculum without replay")
    return need


class _HostSlab:
    """One host tensor of exactly the bytes asked for, page-locked with ``cudaHostRegister`` when
    ``pin`` (PyTorch's pinned allocator rounds every block up to a power of two and caches freed
    blocks: a 12.7 GiB buffer would take 16 GiB, and the next stage's buffer more on top)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, pin: bool) -> None:
        self.tensor = torch.empty(tuple(shape), dtype=dtype)
        self._pinned = False
        if pin:
            nbytes = self.tensor.numel() * self.tensor.element_size()
            err = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0))
            if err != 0:
                raise RuntimeError(f"ReplayBuffer: page-locking {nbytes / 2 ** 30:.2f} GiB of host memory failed "
                                   f"(cudaError {err}); lower replay_buffer or pass pin_memory=False")
            self._pinned = True

    def release(self) -> None:
        """Unlock the memory once no copy can still be reading or writing it."""
        if self._pinned:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class ReplayBuffer:
    """FIFO store of loader-batch chunks on the CPU with seeded uniform replay.

    Storage is a ring of ``capacity`` loader-batch slots per tensor, allocated at the first store
    with the exact size a full buffer needs (:func:`buffer_bytes`); a new loader batch overwrites
    the oldest slot once the ring is full.

    Args:
        capacity: loader batches kept; the oldest whole loader batch is evicted beyond it.
        replay_times: rt; each step returns ``rt`` times the loader batch.
        chunks_per_batch: chunks each loader batch is split into (32 officially); the loader
            batch size must be divisible by it.
        store_dtypes: per tensor passed to :meth:`step`, the dtype it is kept in on the CPU (for
            instance ``torch.uint8`` for images, ``torch.float16`` for float tensors); ``None``
            keeps the tensor's dtype. Replayed chunks come back in the fresh tensor's dtype.
        pin_memory: page-lock the ring (default: when CUDA is available), so the copies to and
            from the device run asynchronously.
        seed: seed of the draw; the same seed and inputs give the same batches.
    """

    def __init__(self, capacity: int, replay_times: int, chunks_per_batch: int = 32,
                 store_dtypes: Optional[Sequence[Optional[torch.dtype]]] = None,
                 pin_memory: Optional[bool] = None, seed: int = 0) -> None:
        for name, v in (("capacity", capacity), ("replay_times", replay_times), ("chunks_per_batch", chunks_per_batch)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ReplayBuffer: {name} must be an integer >= 1, got {v!r}")
        self.capacity = capacity
        self.replay_times = replay_times
        self.chunks_per_batch = chunks_per_batch
        self.store_dtypes = None if store_dtypes is None else tuple(store_dtypes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._slabs: List[_HostSlab] = []      # per tensor: [capacity, loader batch, ...]
        self._next = 0                          # slot the next loader batch goes to
        self._count = 0                         # loader batches stored (<= capacity)

    def __len__(self) -> int:
        """Number of chunks currently stored."""
        return self._count * self.chunks_per_batch

    @property
    def num_batches(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by stored chunks."""
        return sum(s.tensor[0].numel() * s.tensor.element_size() for s in self._slabs) * self._count

    @property
    def allocated_bytes(self) -> int:
        """Host memory the ring takes (a full buffer's worth from the first store on)."""
        return sum(s.tensor.numel() * s.tensor.element_size() for s in self._slabs)

    def clear(self) -> None:
        """Empty the buffer and give its memory back (at every stage change)."""
        for s in self._slabs:
            s.release()
        self._slabs, self._next, self._count = [], 0, 0

    def _slot_of(self, b: int) -> int:
        """Ring slot of the ``b``-th oldest stored loader batch."""
        return (self._next - self._count + b) % self.capacity

    def chunk(self, j: int, p: int) -> torch.Tensor:
        """Tensor ``j`` of the ``p``-th stored chunk, oldest first."""
        b, c = divmod(p, self.chunks_per_batch)
        batch = self._slabs[j].tensor[self._slot_of(b)]
        size = batch.shape[0] // self.chunks_per_batch
        return batch[c * size:(c + 1) * size]

    def _store(self, tensors: Sequence[torch.Tensor]) -> None:
        n = tensors[0].shape[0]
        if n % self.chunks_per_batch:
            raise ValueError(
                f"ReplayBuffer: loader batch size {n} is not divisible by chunks_per_batch="
                f"{self.chunks_per_batch}; use a batch size that is a multiple of it")
        dtypes = self.store_dtypes or (None,) * len(tensors)
        if len(dtypes) != len(tensors):
            raise ValueError(f"ReplayBuffer: store_dtypes has {len(dtypes)} entries but step() got {len(tensors)} tensors")
        if not self._slabs:
            self._slabs = [_HostSlab((self.capacity, *t.shape), dt or t.dtype, self.pin_memory)
                           for t, dt in zip(tensors, dtypes)]
        for t, slab in zip(tensors, self._slabs):
            if tuple(t.shape) != tuple(slab.tensor.shape[1:]):
                raise ValueError(f"ReplayBuffer: a loader batch of shape {tuple(t.shape)} after batches of shape "
                                 f"{tuple(slab.tensor.shape[1:])}; every loader batch of a stage has one shape")
            t = t.detach().to(slab.tensor.dtype)                 # convert on the tensor's device (less to copy)
            slab.tensor[self._next].copy_(t, non_blocking=self.pin_memory and t.device.type == "cuda")
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def step(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Store a fresh loader batch and return it with ``(rt - 1) * chunks_per_batch`` replayed
        chunks appended (each tensor concatenated along dim 0, on the fresh tensor's device)."""
        if not tensors:
            raise ValueError("ReplayBuffer.step: pass at least one tensor (e.g. images, targets)")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"ReplayBuffer.step: tensors disagree on batch size: {[t.shape[0] for t in tensors]}")
        self._store(tensors)
        if self.replay_times == 1:
            return tuple(tensors)
        k = (self.replay_times - 1) * self.chunks_per_batch
        picks = torch.randint(len(self), (k,), generator=self.generator).tolist()
        out = []
        for j, fresh in enumerate(tensors):
            chunks = [self.chunk(j, p) for p in picks]
            if fresh.device.type == "cpu":
                replayed = torch.cat(chunks)
            else:   # chunk by chunk: the host never reads memory a pending copy may still write
                replayed = torch.cat([c.to(fresh.device, non_blocking=self.pin_memory) for c in chunks])
            out.append(torch.cat([fresh, replayed.to(fresh.dtype)]))
        return tuple(out)

    def state_dict(self) -> dict:
        """RNG state for resumption (the stored chunks are not saved: a resumed run refills them)."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
