#!/usr/bin/env python
"""Peak host memory of the kNN monitor's bank and scoring (one process, CPU), against the formula
docs/knn_memory.md uses for ImageNet-sized banks: synthetic features (no model), N bank rows of
width D, V queries, k=20.

    python tools/benchmark_knn_memory.py [--bank 300000] [--dim 768] [--queries 5000]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engine.knn import extract_bank, extract_features, knn_counts  # noqa: E402

CHUNK, BLOCK = 1024, 65536          # knn_votes' defaults: queries x bank rows scored at a time


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(1), i % 1000


def formula_gb(n: int, d: int, v: int, world: int = 1) -> float:
    """bf16 bank + this rank's bf16 share (when gathered) + float32 similarities of a chunk x block
    (and top-k's copy of them) + the float32 block + this rank's float32 queries."""
    share = -(-n // world) * d * 2 if world > 1 else 0
    return (n * d * 2 + share + 2 * CHUNK * BLOCK * 4 + BLOCK * d * 4 + -(-v // world) * d * 4) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=5000)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), a.dim, generator=g)

    torch.randn(10)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    bank, labels = extract_bank(features, Rows(a.bank), torch.device("cpu"), batch_size=1024)
    query, query_y = extract_features(features, Rows(a.queries), torch.device("cpu"), batch_size=1024, gather=False)
    knn_counts(bank, labels, query, query_y, 20, 0.07, 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 - base
    print(f"bank {a.bank} x {a.dim}, {a.queries} queries: peak RSS growth {peak:.2f} GB, "
          f"formula {formula_gb(a.bank, a.dim, a.queries):.2f} GB")


if __name__ == "__main__":
    main()
