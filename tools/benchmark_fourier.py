#!/usr/bin/env python
"""Cost of the low-frequency crop per image (default batch 256 x 3 x 224 x 224 -> 96/160/192).

Compares, in one run on one device, our separable real-input crop with a straightforward
full-``fft2`` + ``fftshift`` implementation and with antialiased bicubic down-sampling, and
prints/saves ratios. Example::

    python tools/benchmark_fourier.py --device cpu --batch 64
    python tools/benchmark_fourier.py --device cuda --dtype bfloat16 --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchlib import device_name, save_result  # noqa: E402
from efficienttrain.fourier import downsample, low_frequency_crop  # noqa: E402


def naive_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Full complex fft2 + fftshift + slice: the textbook form, for comparison only."""
    H, W = x.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    r0, c0 = H // 2 - size // 2, W // 2 - size // 2
    block = torch.fft.ifftshift(spec[..., r0:r0 + size, c0:c0 + size], dim=(-2, -1))
    return (torch.fft.ifft2(block).real * (size * size / (H * W))).to(x.dtype)


def timeit(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 192])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device).to(dtype)
    dev_name = device_name(device)

    rows: List[Dict[str, float]] = []
    print(f"device: {dev_name}; batch {args.batch} x 3 x {args.input_size}^2 {args.dtype}; median of {args.iters}")
    print(f"{'size':>5} {'crop ms':>9} {'us/img':>8} {'naive ms':>9} {'naive/crop':>10} {'bicubic ms':>10} {'crop/bicubic':>12}")
    for s in args.sizes:
        t_crop = timeit(lambda: low_frequency_crop(x, s), device, args.warmup, args.iters)
        t_naive = timeit(lambda: naive_crop(x, s), device, args.warmup, args.iters)
        t_down = timeit(lambda: downsample(x, s, "bicubic"), device, args.warmup, args.iters)
        row = {"size": s, "crop_ms": t_crop * 1e3, "crop_us_per_image": t_crop * 1e6 / args.batch,
               "naive_fft2_ms": t_naive * 1e3, "naive_over_crop": t_naive / t_crop,
               "bicubic_ms": t_down * 1e3, "crop_over_bicubic": t_crop / t_down}
        rows.append(row)
        print(f"{s:>5} {row['crop_ms']:>9.2f} {row['crop_us_per_image']:>8.1f} {row['naive_fft2_ms']:>9.2f} "
              f"{row['naive_over_crop']:>10.2f} {row['bicubic_ms']:>10.2f} {row['crop_over_bicubic']:>12.2f}")

    save_result({"benchmark": "low_frequency_crop", "device": dev_name, "batch": args.batch,
                 "input_size": args.input_size, "dtype": args.dtype, "iters": args.iters, "rows": rows},
                args.out, f"fourier_{device.type}_{args.dtype}_b{args.batch}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
