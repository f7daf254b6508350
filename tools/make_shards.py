#!/usr/bin/env python
"""Pack an image folder (ImageFolder layout or any tree) or a .txt list of images into
WebDataset-style tar shards with their indexes (see engine/shards.py), for cluster file systems.

    .venv/bin/python tools/make_shards.py /data/imagenet/train /data/in1k-shards --prefix train
    .venv/bin/python tools/make_shards.py images.txt out/ --max-count 5000 --max-size 500MB --overwrite

Prints the ``data.path=`` value that reads the shards (a brace pattern).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engine.shards import TarShardSource, write_shards  # noqa: E402

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1073741824``, ``500MB``, ``1GB``, ``1.5G``, ``64KiB`` (units are binary: 1GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None or float(m.group(1)) * UNITS[m.group(2)] < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (give bytes, or e.g. 500MB, 1GB)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="image folder (ImageFolder layout: class subfolders give labels) or .txt list")
    ap.add_argument("out", help="folder for the shards")
    ap.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default: shard)")
    ap.add_argument("--max-count", type=int, default=10000, help="images per shard at most (default: 10000)")
    ap.add_argument("--max-size", type=parse_size, default=1 << 30, help="bytes per shard at most (default: 1GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace the .tar shards already in OUT")
    args = ap.parse_args()
    try:
        shards = write_shards(args.src, args.out, args.prefix, args.max_count, args.max_size, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(shards)
    name = f"{args.prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else os.path.basename(shards[0])
    path = os.path.join(os.path.abspath(args.out), name)
    labels = " with class labels (classes.txt)" if os.path.exists(os.path.join(args.out, "classes.txt")) else ""
    k = len(TarShardSource.open(path))
    print(f"wrote {n} shard{'s' if n != 1 else ''}, {k} image{'s' if k != 1 else ''}{labels}, to {args.out}")
    print(f"data.path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
