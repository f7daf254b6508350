#!/usr/bin/env python
"""Top-1 on low-pass and high-pass filtered validation sets for a range of bandwidths
(EfficientTrain Figure 4 / Table 1) for any classifier checkpoint written by ``finetune``.

    python tools/analyze_frequency.py runs/x/checkpoints/checkpoint-best.pth /data/imagenet/val \
        --radii 10 20 40 60 80 --out freq.png [--limit 5000]

The filters are circular masks of radius r (in DFT bins) on the centred spectrum of each
normalised image (``efficienttrain.fourier.low_pass_filter`` / ``high_pass_filter``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from efficienttrain.fourier import high_pass_filter, low_pass_filter  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from finetune.config import ClassifierConfig  # noqa: E402
from engine.data import EvalDataset, eval_transform, image_folder  # noqa: E402
from finetune.models import create_classifier, make_linear_probe  # noqa: E402
from finetune.task import evaluate  # noqa: E402


def load_classifier(path: str) -> torch.nn.Module:
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta", {})
    if "model_name" not in meta:
        raise ValueError(f"{path} is not a classifier checkpoint written by `python -m finetune` (no meta.model_name)")
    cfg = ClassifierConfig(name=meta["model_name"], num_classes=meta["num_classes"], img_size=meta["img_size"],
                           global_pool=meta.get("global_pool", "avg"), kwargs=meta.get("model_kwargs", {}))
    model = create_classifier(cfg)
    if meta.get("linear_probe"):
        make_linear_probe(model)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="validation folder in ImageFolder layout")
    ap.add_argument("--radii", type=float, nargs="+", default=[10, 20, 40, 60, 80])
    ap.add_argument("--crop-pct", type=float, default=0.875)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="frequency.png")
    args = ap.parse_args()
    try:
        model = load_classifier(args.checkpoint).to(args.device)
        files, labels, _ = image_folder(args.data)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        step = max(1, len(files) // args.limit)
        files, labels = files[::step][: args.limit], labels[::step][: args.limit]
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 224
    ds = EvalDataset(files, labels, eval_transform(size, args.crop_pct))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=min(8, os.cpu_count() or 1))
    device = torch.device(args.device)
    result = {"checkpoint": args.checkpoint, "images": len(files), "original": evaluate(model, loader, device)["top1"],
              "low_pass": {}, "high_pass": {}}
    for r in args.radii:
        result["low_pass"][r] = evaluate(model, loader, device, transform=lambda x: low_pass_filter(x, r))["top1"]
        result["high_pass"][r] = evaluate(model, loader, device, transform=lambda x: high_pass_filter(x, r))["top1"]
        print(f"r={r:g}: low-pass top-1 {result['low_pass'][r]:.2f}%  high-pass top-1 {result['high_pass'][r]:.2f}%")
    print(f"original: top-1 {result['original']:.2f}%")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(args.radii, [result["low_pass"][r] for r in args.radii], "o-", label="low-pass filtered")
    ax.plot(args.radii, [result["high_pass"][r] for r in args.radii], "s--", label="high-pass filtered")
    ax.axhline(result["original"], color="gray", lw=1, label="original")
    ax.set_xlabel("filter radius r (DFT bins)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(os.path.basename(args.checkpoint))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
