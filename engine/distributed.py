"""Process-group set-up for single process, torchrun single-node and multi-node runs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine; allowed here: auto, cpu")
    dev = torch.device(name)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (nothing when not distributed). Pass a tensor that Python
    keeps alive (e.g. an attribute): gloo's worker thread then never has to take the GIL to free
    it, which can deadlock with a process group being destroyed (see :func:`cleanup`)."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Tear the process group down once every rank got here. The barrier (which waits with the
    GIL released) lets gloo's worker threads finish freeing earlier work first: destroying a
    process group joins those threads while holding the GIL, and a thread still freeing a
    Python-owned tensor would wait for the GIL forever. Release DDP wrappers before this."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
