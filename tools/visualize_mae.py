#!/usr/bin/env python
"""Reconstruction grid (original | masked | reconstruction | reconstruction + visible) for any MAE
checkpoint, ours or an official MAE release file, on any images.

    python tools/visualize_mae.py runs/demo/checkpoints/checkpoint-latest.pth img1.jpg img2.png \
        --out recon.png [--size 224] [--mask-ratio 0.75] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from efficienttrain.fourier import low_frequency_crop  # noqa: E402
from pretrain.checkpoints import load_mae  # noqa: E402
from engine.data import Normalizer  # noqa: E402
from pretrain.data import center_crop_tensor  # noqa: E402
from pretrain.visualize import reconstruction_grid  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--out", default="reconstruction.png")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's final size); "
                    "smaller sizes are low-frequency cropped, as in a curriculum stage")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        model, meta = load_mae(args.checkpoint)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = model.img_size
    size = args.size or final
    if size % model.patch_size or size > final:
        print(f"error: --size {size} must be a multiple of the patch size {model.patch_size} and at most {final}",
              file=sys.stderr)
        return 2
    crops = []
    for p in args.images:
        try:
            with open(p, "rb") as f:
                crops.append(center_crop_tensor(f.read(), final))
        except OSError as e:
            print(f"error: cannot read image {p}: {e}", file=sys.stderr)
            return 2
    imgs = Normalizer("cpu")(low_frequency_crop(torch.stack(crops).float(), size))
    print(reconstruction_grid(model, imgs, args.out, args.mask_ratio, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
