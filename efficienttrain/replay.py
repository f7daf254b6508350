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

from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

import torch


def buffer_bytes(capacity: int, loader_batch: int, sample_shape: Sequence[int], bytes_per_element: int = 2) -> int:
    """Memory a full buffer holds per process: ``capacity`` loader batches of ``loader_batch``
    samples of ``sample_shape`` (e.g. (3, 96, 96) in float16, as the official code stores them)."""
    n = 1
    for d in sample_shape:
        n *= int(d)
    return int(capacity) * int(loader_batch) * n * int(bytes_per_element)


class ReplayBuffer:
    """FIFO store of loader-batch chunks on the CPU with seeded uniform replay.

    Args:
        capacity: loader batches kept; the oldest whole loader batch is evicted beyond it.
        replay_times: rt; each step returns ``rt`` times the loader batch.
        chunks_per_batch: chunks each loader batch is split into (32 officially); the loader
            batch size must be divisible by it.
        store_dtypes: per tensor passed to :meth:`step`, the dtype it is kept in on the CPU (for
            instance ``torch.uint8`` for images, ``torch.float16`` for float tensors); ``None``
            keeps the tensor's dtype. Replayed chunks come back in the fresh tensor's dtype.
        pin_memory: keep chunks in pinned memory (default: when CUDA is available), so the copies
            to and from the device run asynchronously.
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
        # One entry per loader batch: its list of chunks, each a tuple of tensors.
        self._batches: Deque[List[Tuple[torch.Tensor, ...]]] = deque()

    def __len__(self) -> int:
        """Number of chunks currently stored."""
        return sum(len(b) for b in self._batches)

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    @property
    def nbytes(self) -> int:
        """Bytes held by stored chunks."""
        return sum(t.numel() * t.element_size() for b in self._batches for chunk in b for t in chunk)

    def clear(self) -> None:
        """Empty the buffer (at every stage change)."""
        self._batches.clear()

    def _store(self, tensors: Sequence[torch.Tensor]) -> None:
        n = tensors[0].shape[0]
        if n % self.chunks_per_batch:
            raise ValueError(
                f"ReplayBuffer: loader batch size {n} is not divisible by chunks_per_batch="
                f"{self.chunks_per_batch}; use a batch size that is a multiple of it")
        dtypes = self.store_dtypes or (None,) * len(tensors)
        if len(dtypes) != len(tensors):
            raise ValueError(f"ReplayBuffer: store_dtypes has {len(dtypes)} entries but step() got {len(tensors)} tensors")
        stored = []
        for t, dt in zip(tensors, dtypes):
            t = t.detach().to(dt or t.dtype)                     # convert on the tensor's device (less to copy)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
            host.copy_(t, non_blocking=self.pin_memory and t.device.type == "cuda")
            stored.append(host)
        chunks = list(zip(*(s.chunk(self.chunks_per_batch) for s in stored)))
        self._batches.append(chunks)
        while len(self._batches) > self.capacity:
            self._batches.popleft()

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
        flat = [chunk for b in self._batches for chunk in b]
        k = (self.replay_times - 1) * self.chunks_per_batch
        picks = torch.randint(len(flat), (k,), generator=self.generator).tolist()
        out = []
        for j, fresh in enumerate(tensors):
            if fresh.device.type == "cpu":
                replayed = torch.cat([flat[i][j] for i in picks])
            else:   # chunk by chunk: the host never reads memory a pending copy may still write
                replayed = torch.cat([flat[i][j].to(fresh.device, non_blocking=self.pin_memory) for i in picks])
            out.append(torch.cat([fresh, replayed.to(fresh.dtype)]))
        return tuple(out)

    def state_dict(self) -> dict:
        """RNG state for resumption (the stored chunks are not saved: a resumed run refills them)."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
