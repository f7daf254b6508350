#!/usr/bin/env python
"""MAE pretraining throughput per curriculum stage, and whole-run wall speedup of a curriculum.

Default mode, in one run on one device: for every distinct input size of the curriculum, training
images/s on synthetic uint8 batches already on the device (low-frequency crop + normalise +
forward/backward/AdamW step), the crop's share of the step time, peak memory, and, with ``--data``,
the images/s the real data pipeline delivers (``--decode cpu|dali``).

``--compare-demo``: times whole pretraining runs (process start to exit, as a user would) of a
config's curriculum and of its baseline (every sample at the final size for
``curriculum.baseline_epochs``), alternating, and prints the measured wall speedup next to the
compute speedup the run prints. The kNN monitor is off in both arms (``--with-eval`` keeps it):
it evaluates at every stage end, ten times for etpp and once for the baseline.

Prints a table and saves JSON (with the device name) under benchmarks/results/.

    python tools/benchmark_pretrain.py --arch mae_vit_base_patch16 --batch 256 --device cuda
    python tools/benchmark_pretrain.py --arch mae_vit_tiny_patch16 --batch 32 --device cpu --steps 3 \
        --data ../shared/datasets/imagenette-112/train --img-size 112 --patch-size 8
    python tools/benchmark_pretrain.py --compare-demo [--config configs/pretrain/demo.yaml] [--repeats 2]

``--data`` above: Imagenette2 (fast.ai, https://github.com/fastai/imagenette; the recorded numbers read a
copy resized to 112x112 in ../shared/datasets/imagenette-112, beside the clone), or any image folder.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import device_name, save_result  # noqa: E402
from efficienttrain.curriculum import get_curriculum  # noqa: E402
from efficienttrain.fourier import low_frequency_crop  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data import open_image_source  # noqa: E402
from engine.decode import DaliDecoder, EncodedBatch  # noqa: E402
from engine.trainer import param_groups  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from engine.data import Normalizer  # noqa: E402
from pretrain.data import MAEPretrainDataset  # noqa: E402
from pretrain.models_mae import ARCHS, create_mae  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def timed_run(config: str, overrides: List[str], out: str) -> Dict[str, float]:
    """Wall seconds of one whole ``python -m pretrain`` process, and its summary.json."""
    cmd = [sys.executable, "-m", "pretrain", "--config", config, *overrides, f"train.output_dir={out}",
           "train.progress=false", "train.resume=never"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return {"wall_s": wall, **json.load(f)}


def compare_demo(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, os.path.join(ROOT, args.config), list(args.overrides))
    if cfg.data.demo:   # generate the demo set first: its one-off creation is not part of either run
        from engine.demo_data import generate_demo_dataset

        generate_demo_dataset(os.path.join(ROOT, cfg.data.path), cfg.data.demo_images)
    baseline_epochs = cfg.curriculum.baseline_epochs or cfg.curriculum.epochs
    # training time is compared: the kNN monitor (one evaluation per stage end: 10 for etpp, 1 for
    # the baseline) is switched off in both arms unless --with-eval
    common = list(args.overrides) if args.with_eval else ["eval.knn.train=''", "eval.knn.val=''", *args.overrides]
    arms = {"curriculum": common,
            "baseline": [*common, "curriculum.name=baseline", f"curriculum.epochs={baseline_epochs}"]}
    results: Dict[str, List[Dict]] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, ov in arms.items():
                res = timed_run(args.config, ov, os.path.join(tmp, f"{name}{rep}"))
                results[name].append(res)
                print(f"{name} run {rep + 1}: {res['wall_s']:.1f} s wall ({res['step_seconds']:.1f} s of steps)", flush=True)
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    steps = {k: statistics.median(r["step_seconds"] for r in v) for k, v in results.items()}
    planned = results["curriculum"][0]["planned_speedup"]
    speedup = wall["baseline"] / wall["curriculum"]
    dev_name = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{args.config} on {dev_name}: baseline {wall['baseline']:.1f} s, curriculum {wall['curriculum']:.1f} s "
          f"(medians of {args.repeats}, whole processes)")
    print(f"wall speedup {speedup:.2f}x / compute speedup {planned:.2f}x = {speedup / planned:.2f} "
          f"(steps only: {steps['baseline'] / steps['curriculum']:.2f}x)")
    save_result({"benchmark": "compare_demo", "device": dev_name, "config": args.config, "overrides": args.overrides,
                 "with_eval": args.with_eval,
                 "repeats": args.repeats, "wall_s": wall, "step_s": steps, "wall_speedup": speedup,
                 "compute_speedup": planned, "wall_over_compute": speedup / planned,
                 "runs": {k: [{"wall_s": r["wall_s"], "step_seconds": r["step_seconds"],
                               "overhead_seconds": r["overhead_seconds"], "stages": r["stages"]} for r in v]
                          for k, v in results.items()}},
                args.out, f"compare_{os.path.splitext(os.path.basename(args.config))[0]}_{dev_name.split()[0].lower()}.json")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare-demo", action="store_true", help="time whole baseline and curriculum runs of --config")
    ap.add_argument("--config", default="configs/pretrain/demo.yaml", help="config for --compare-demo")
    ap.add_argument("--repeats", type=int, default=1, help="--compare-demo: runs per arm (medians are reported)")
    ap.add_argument("--with-eval", action="store_true", help="--compare-demo: keep the config's kNN monitor on")
    ap.add_argument("overrides", nargs="*", help="--compare-demo: key=value overrides for both arms")
    ap.add_argument("--arch", default="mae_vit_base_patch16", choices=list(ARCHS))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--target", default="norm_pixel")
    ap.add_argument("--curriculum", default="etpp")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--data", default=None, help="image folder / list / shards: also measure the real data pipeline")
    ap.add_argument("--decode", default="cpu", choices=["cpu", "dali", "device"],
                    help="data pipeline path for --data (device: the former name of dali)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.compare_demo:
        return compare_demo(args)
    if args.overrides:
        ap.error("key=value overrides only apply with --compare-demo")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    kw = {"img_size": args.img_size, "target": args.target}
    if args.patch_size:
        kw["patch_size"] = args.patch_size
    model = create_mae(args.arch, **kw).to(device)
    patch = model.patch_size
    cur = get_curriculum(args.curriculum, args.img_size, patch)
    sizes = sorted({s.size for s in cur.stages})
    amp = None if args.amp == "off" or (args.amp == "auto" and device.type != "cuda") else (
        torch.bfloat16 if args.amp in ("auto", "bf16") else torch.float16)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if device.type == "cuda" else {}))
    dev_name = device_name(device)
    normalize = Normalizer(device)
    batch = torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)

    rows: List[Dict[str, float]] = []
    for size in sizes:
        def crop_only():
            return normalize(low_frequency_crop(batch.float(), size))

        def train_step():
            x = normalize(low_frequency_crop(batch.float(), size))
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _, _ = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_step = timed(train_step, device, args.steps, args.warmup)
        t_crop = timed(crop_only, device, args.steps, args.warmup)
        mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        rows.append({"size": size, "grid": size // patch, "train_images_per_s": args.batch / t_step,
                     "step_ms": t_step * 1e3, "crop_ms": t_crop * 1e3, "crop_share": t_crop / t_step,
                     "peak_mem_gb": mem})
    base = next(r for r in rows if r["size"] == args.img_size)["train_images_per_s"]
    for r in rows:
        r["speed_vs_final"] = r["train_images_per_s"] / base

    loader_ips = None
    if args.data:
        source = open_image_source(args.data)
        ds = MAEPretrainDataset(source, args.img_size, decode=args.decode)
        decoder = DaliDecoder(args.img_size, device, ds.fallback) if args.decode in ("dali", "device") else None
        n = min(len(source), args.batch * (args.steps + args.warmup))
        idx = [(i % len(source), i, 0.0, args.img_size) for i in range(n)]
        batches = [idx[i:i + args.batch] for i in range(0, n - args.batch + 1, args.batch)]
        dl = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=args.workers, collate_fn=ds.collate)
        it = iter(dl)
        next(it)
        t0, got = time.perf_counter(), 0
        for b in it:
            imgs = decoder(EncodedBatch(*b))[0] if decoder is not None else b[0]
            got += imgs.shape[0]
        sync(device)
        loader_ips = got / (time.perf_counter() - t0)

    mem_label = "peak GPU GB" if device.type == "cuda" else "peak RSS GB"
    print(f"{args.arch} (patch {patch}, final {args.img_size}, target {args.target}) on {dev_name}, "
          f"batch {args.batch}, amp {amp}, {args.steps} timed steps")
    print(f"{'size':>5} {'grid':>5} {'img/s':>9} {'x final':>8} {'step ms':>9} {'crop ms':>8} {'crop %':>7} {mem_label:>12}")
    for r in rows:
        print(f"{r['size']:>5} {r['grid']:>5} {r['train_images_per_s']:>9.1f} {r['speed_vs_final']:>8.2f} "
              f"{r['step_ms']:>9.1f} {r['crop_ms']:>8.2f} {100 * r['crop_share']:>6.1f}% {r['peak_mem_gb']:>12.2f}")
    if loader_ips is not None:
        print(f"real data pipeline ({args.workers} workers, decode {args.decode}, {args.data}): {loader_ips:.1f} images/s")

    save_result({"benchmark": "pretrain", "device": dev_name, "arch": args.arch, "patch_size": patch,
                 "img_size": args.img_size, "target": args.target, "batch": args.batch, "amp": str(amp),
                 "curriculum": args.curriculum, "rows": rows, "loader_images_per_s": loader_ips,
                 "decode": args.decode if args.data else None},
                args.out, f"pretrain_{args.arch}_{device.type}_b{args.batch}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
