"""CPU thread policy for the entry points, applied before torch is imported.

Why: PyTorch's CPU kernels run on OpenMP threads that spin while they wait for each other. When
another busy process takes a core, a spinning thread that lost its core holds every other thread
up at the next barrier and a 2-core training run collapses to a few percent of its speed
(benchmarks/results/cpu_load_demo.md: 0.27-0.40 of idle speed beside one busy process).
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep instead: 0.65-0.79 of idle speed beside
the busy process, for about 10 % less idle speed in the demo's smallest (20 px) stage.

Only unset variables are set (a user's ``OMP_WAIT_POLICY`` / ``OMP_NUM_THREADS`` win), and
``ET_CPU_THREADS=off`` leaves the environment alone. OpenMP reads these when the library loads,
so :func:`configure` must run before ``import torch``; every ``python -m`` entry point calls it
first. This module imports nothing heavy on purpose.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional


def configure(env: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set the default wait policy in ``env`` (``os.environ``); returns what was set, or None."""
    env = os.environ if env is None else env
    if env.get("ET_CPU_THREADS", "").lower() in ("off", "0", "false", "no"):
        return None
    if "OMP_WAIT_POLICY" in env or "torch" in sys.modules:
        return None                    # the user's choice, or too late to take effect
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE"
