"""Process-group set-up for single process, torchrun single-node and multi-node runs."""
from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

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


def nvidia_devices() -> Tuple[List[str], Optional[str]]:
    """The NVIDIA device files of this machine and the kernel driver's version (from
    /proc/driver/nvidia/version), whether or not torch can use them."""
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    driver = None
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", f.read())
            driver = m.group(1) if m else "unknown"
    except OSError:
        pass
    return devices, driver


def _cuda_unusable(devices: List[str], driver: Optional[str]) -> ConfigError:
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as e:  # torch says why (e.g. "The NVIDIA driver on your system is too old")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(
        f"train.device=auto: {len(devices) or 'the'} NVIDIA GPU(s) are present (driver {driver or 'not loaded'}) but "
        f"this torch cannot use CUDA (torch {torch.__version__}, built for CUDA {torch.version.cuda}): {reason}. A "
        "driver older than the CUDA of the torch build is the usual cause: update the driver, or install a torch "
        "build for the driver's CUDA; set train.device=cpu to train on the CPU on purpose")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU when CUDA works, the CPU on a machine without NVIDIA devices; a
    machine whose NVIDIA devices CUDA cannot use is an error, never a silent CPU run."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        devices, driver = nvidia_devices()
        if devices or driver:
            raise _cuda_unusable(devices, driver)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine; allowed here: auto, cpu")
    dev = torch.device(name)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def dali_version() -> Optional[str]:
    """The installed NVIDIA DALI's version (read from the package metadata: DALI is not imported)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{dist.version} ({name})"
    return None


def describe_environment(device: torch.device) -> str:
    """The versions a GPU run's behaviour depends on, for the run's log."""
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else "none usable"
    devices, driver = nvidia_devices()
    return (f"environment: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), NVIDIA driver "
            f"{driver or 'none'}, GPUs: {gpus}, DALI {dali_version() or 'not installed'}, Python "
            f"{platform.python_version()}; training on {device}")


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
