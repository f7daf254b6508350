"""How a CPU training run holds up when another busy process shares the machine.

Runs the pretraining demo's first stage (20 px, the step with the largest share of fixed per-step
costs) for ``--steps`` optimizer steps, idle and beside one busy single-threaded process, under
each thread setting, and reports images/s and the busy / idle ratio measured in one run:

    .venv/bin/python tools/benchmark_cpu_load.py --json benchmarks/results/cpu_load_demo.json

Settings (environment of the training process): ``torch-default`` (intra-op threads = cores,
OpenMP's active spin-wait), ``passive`` (``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep),
``threads-1`` (``OMP_NUM_THREADS=1``), ``spin-10k`` (GNU OpenMP spins 10k iterations, then
sleeps: ``GOMP_SPINCOUNT=10000``), and ``toolkit`` (what the entry points set by default,
``engine.threads``). A spinning thread that loses its core to another process holds up every
other thread at the next barrier; that is the collapse this measures.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS: Dict[str, Dict[str, Optional[str]]] = {
    "torch-default": {"ET_CPU_THREADS": "off"},
    "passive": {"ET_CPU_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE"},
    "threads-1": {"ET_CPU_THREADS": "off", "OMP_NUM_THREADS": "1"},
    "spin-10k": {"ET_CPU_THREADS": "off", "GOMP_SPINCOUNT": "10000"},
    "toolkit": {},
}


def _spin(stop: "mp.synchronize.Event") -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_once(setting: str, steps: int, busy: bool, data: str) -> float:
    """Median images/s over the logged intervals after the first (warm-up) of one short run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ET_CPU_THREADS")}
    env.update({k: v for k, v in SETTINGS[setting].items() if v is not None})
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pretrain", "--config", os.path.join(ROOT, "configs/pretrain/demo.yaml"),
               f"data.path={data}", f"train.max_steps={steps}", f"train.output_dir={out}/run",
               "train.progress=false", "train.log_every=5", "eval.knn.train=''", "eval.knn.val=''"]
        if spinner is not None:
            spinner.start()
            time.sleep(1.0)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        finally:
            if spinner is not None:
                stop.set()
                spinner.join()
        if proc.returncode != 0:
            raise SystemExit(f"{setting} ({'busy' if busy else 'idle'}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    return statistics.median(rates)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (all in the 20 px stage)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--data", default=os.path.join(ROOT, "data/demo"), help="the demo set (generated if missing)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        ap.error(f"unknown settings {bad}; allowed: {', '.join(SETTINGS)}")
    results = {}
    for name in names:
        idle = run_once(name, args.steps, False, args.data)
        busy = run_once(name, args.steps, True, args.data)
        results[name] = {"idle_img_s": idle, "busy_img_s": busy, "busy_over_idle": busy / idle}
        print(f"{name:14s} idle {idle:7.0f} img/s   busy {busy:7.0f} img/s   busy/idle {busy / idle:.2f}", flush=True)
    report = {"what": "pretraining demo, 20 px stage, images/s (median of 5-step intervals after the first)",
              "steps": args.steps, "cores": os.cpu_count(), "load_before": os.getloadavg()[0], "results": results}
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
