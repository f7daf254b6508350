#!/usr/bin/env python
"""What the MAE data path costs per image, for each decode path, and how many CPU cores per GPU
that means at the throughput ViT-B / ViT-L reach in every EfficientTrain++ stage.

For each path (``cpu``: PIL decode + RandomResizedCrop + flip in the worker; ``dali``: the worker
reads the bytes and the JPEG header and draws the crop, a DALI pipeline in the training process
decodes the crop, resizes and flips it: nvJPEG on CUDA, DALI's CPU backend with ``--device cpu``):

- worker ms per image: CPU time of one worker on one core (the dataset items and the collate,
  run in this process with one thread, over the same images, page cache warm; median of 3 passes);
- training-process ms per image: for ``cpu`` the host-to-device copy of the uint8 batch, for
  ``dali`` the pipeline run (decode of the crop + resize + flip, and the copy out; wall time, the
  decoder's threads included);
- cores per GPU: model images/s x worker ms / 1000, where images/s comes from the MAE model's
  training FLOPs per image (forward + backward, counted with torch.utils.flop_counter at every
  stage size, mask ratio 0.75) at a stated MFU of a stated peak (default: 30 % of an H100's
  989 dense bf16 TFLOP/s). These model throughputs are estimates, not measurements.

    python tools/benchmark_data.py ../shared/datasets/coco-mini/train2017
    python tools/benchmark_data.py /data/imagenet/train --images 2000 --device cuda --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import device_name, save_result  # noqa: E402
from efficienttrain.curriculum import get_curriculum  # noqa: E402
from engine.data import open_image_source  # noqa: E402
from engine.decode import DaliDecoder, EncodedBatch  # noqa: E402
from pretrain.data import MAEPretrainDataset  # noqa: E402
from pretrain.models_mae import create_mae  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_ms(ds: MAEPretrainDataset, keys: List, batch: int, repeats: int = 3) -> float:
    """CPU ms per image of the worker's share: items + collate, one thread (median of ``repeats``
    passes over ``keys``, after a warm-up pass that fills the page cache)."""
    for k in keys:
        ds[k]
    passes = []
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(0, len(keys), batch):
            ds.collate([ds[k] for k in keys[i:i + batch]])
        passes.append((time.process_time() - t0) * 1e3 / len(keys))
    return statistics.median(passes)


def training_ms(ds: MAEPretrainDataset, keys: List, batch: int, device: torch.device) -> Dict[str, float]:
    """Training-process ms per image (wall time; for DALI its pipeline run, counts and backend)."""
    batches = [ds.collate([ds[k] for k in keys[i:i + batch]]) for i in range(0, len(keys), batch)]
    if ds.decode == "cpu":
        batches[0][0].to(device)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            b[0].pin_memory().to(device, non_blocking=True) if device.type == "cuda" else b[0].to(device)
        sync(device)
        return {"total_ms": (time.perf_counter() - t0) * 1e3 / len(keys)}
    decoder = DaliDecoder(ds.size, device, ds.fallback)
    decoder(EncodedBatch(*batches[0]))          # warm-up (pipeline build, decoder handles)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        decoder(EncodedBatch(*b))
    sync(device)
    total = time.perf_counter() - t0
    decoder.close()
    return {"total_ms": total * 1e3 / len(keys), "backend": decoder.backend, "fallbacks": decoder.fallbacks,
            "worker_decoded": decoder.worker_decoded}


def training_flops(arch: str, size: int, final: int) -> float:
    """Forward + backward FLOPs of one MAE training image at input ``size`` (counted, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_mae(arch, img_size=final)
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(x, mask_ratio=0.75)
        loss.backward()
    return float(counter.get_total_flops())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="image folder, .txt list or tar shards (JPEGs for the DALI path)")
    ap.add_argument("--size", type=int, default=224, help="final (crop) size")
    ap.add_argument("--images", type=int, default=256, help="images timed per path")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mfu", type=float, default=0.30, help="model FLOP utilisation assumed for the GPU table")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (default H100 SXM dense bf16)")
    ap.add_argument("--archs", nargs="+", default=["mae_vit_base_patch16", "mae_vit_large_patch16"])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables (and save nothing)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        source = open_image_source(args.data)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)                    # one worker, one core
    n = min(args.images, len(source))
    keys = [(i % len(source), i, 0.0, args.size) for i in range(n)]
    paths: Dict[str, Dict] = {}
    for mode in ("cpu", "dali"):
        ds = MAEPretrainDataset(source, args.size, decode=mode)
        paths[mode] = {"worker_ms_per_image": worker_ms(ds, keys, args.batch),
                       "training_process": training_ms(ds, keys, args.batch, device)}
    ratio = paths["cpu"]["worker_ms_per_image"] / paths["dali"]["worker_ms_per_image"]

    sizes = sorted({s.size for s in get_curriculum("etpp", args.size, 16).stages})
    table = []
    for arch in args.archs:
        for size in sizes:
            flops = training_flops(arch, size, args.size)
            ips = args.mfu * args.peak_tflops * 1e12 / flops
            table.append({"arch": arch, "size": size, "train_gflop_per_image": flops / 1e9,
                          "gpu_images_per_s_estimate": ips,
                          "cores_per_gpu": {m: ips * p["worker_ms_per_image"] / 1e3 for m, p in paths.items()}})
    result = {"benchmark": "data", "data": args.data, "images": n, "size": args.size, "device": device_name(device),
              "paths": paths, "worker_cost_ratio_cpu_over_dali": ratio, "mfu": args.mfu,
              "peak_tflops": args.peak_tflops, "cores_per_gpu": table}
    if args.json:                               # stdout is the JSON object only (nothing saved)
        print(json.dumps(result, indent=2))
        return 0
    save_result(result, args.out, f"data_{device.type}_{args.size}.json")
    print(f"{args.data}: {n} images, crop to {args.size}, training process on {result['device']}")
    print(f"{'path':>7} {'worker ms/img':>14} {'training ms/img':>16}")
    for m, p in paths.items():
        print(f"{m:>7} {p['worker_ms_per_image']:>14.3f} {p['training_process']['total_ms']:>16.3f}")
    dev = paths["dali"]["training_process"]
    print(f"dali path: {dev['backend']}, {dev['total_ms']:.3f} ms/img in the training process; "
          f"worker cost cpu/dali = {ratio:.1f}x")
    print(f"cores per GPU needed (GPU images/s: ESTIMATE at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s)")
    print(f"{'model':>24} {'size':>5} {'GFLOP/img':>10} {'img/s':>8} {'cores (cpu)':>12} {'cores (dali)':>15}")
    for r in table:
        print(f"{r['arch']:>24} {r['size']:>5} {r['train_gflop_per_image']:>10.1f} {r['gpu_images_per_s_estimate']:>8.0f} "
              f"{r['cores_per_gpu']['cpu']:>12.1f} {r['cores_per_gpu']['dali']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
