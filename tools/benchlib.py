"""Helpers shared by the benchmark scripts: device naming and saving results with their command."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Dict

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_result(result: Dict[str, Any], folder: str, name: str) -> str:
    """Write ``result`` (plus the device-independent command line and torch version) atomically."""
    result = {**result, "torch": torch.__version__, "command": " ".join(["python"] + sys.argv)}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"saved {path}")
    return path
