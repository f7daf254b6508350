"""Command line: ``python -m efficienttrain show NAME`` prints a curriculum's stage table.

Examples::

    python -m efficienttrain list
    python -m efficienttrain show etpp --epochs 200
    python -m efficienttrain show et --epochs 300 --final-size 384 --multiple-of 32 --json
    python -m efficienttrain show my_curriculum.yaml --plot curriculum.png
    python -m efficienttrain show etpp --epochs 200 --model swin_tiny_patch4_window7_224
    python -m efficienttrain search configs/search/demo_etpp.yaml [--output DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from .curriculum import BUILTIN, DEFAULT_MULTIPLE_OF, Curriculum, CurriculumError, get_curriculum
from .plot import plot_curriculum

DEFAULT_EPOCHS = {"epochs": 300.0, "compute": 200.0}


def format_table(cur: Curriculum, epochs: float, baseline_epochs: float,
                 flops: Optional[Dict[str, Any]] = None) -> str:
    """The stage table; with ``flops`` (:func:`model_flops`) two more columns (a sample's pixel and
    FLOP cost relative to the final size) and the FLOP-based saving under the pixel one."""
    unit = "epochs" if cur.budget == "epochs" else "equivalent epochs at the final size"
    extra = f" {'px cost':>8} {'FLOP cost':>9}" if flops else ""
    lines = [
        f"curriculum {cur.name!r}: budget {epochs:g} {unit}, final size {cur.final_size}"
        + (f" ({cur.description})" if cur.description else ""),
        f"{'stage':>5} {'size':>5} {'RandAug m':>11} {'share':>7} {'replay':>6} {'data epochs':>12} {'start':>9} {'end':>9}"
        + extra,
    ]
    for r in cur.table(epochs):
        m = (f"{r['magnitude_start']:.1f}" if r["magnitude_start"] == r["magnitude_end"]
             else f"{r['magnitude_start']:.1f}-{r['magnitude_end']:.1f}")
        lines.append(f"{r['stage']:>5} {r['size']:>5} {m:>11} {r['share']:>7.3f} {r['replay_times']:>6} "
                     f"{r['data_epochs']:>12.2f} {r['data_epoch_start']:>9.2f} {r['data_epoch_end']:>9.2f}"
                     + (f" {(r['size'] / cur.final_size) ** 2:>8.3f} {flops['ratio'][str(r['size'])]:>9.3f}"
                        if flops else ""))
    lines.append(f"compute: {cur.compute(epochs):.2f} equivalent epochs at {cur.final_size}; "
                 f"speedup vs baseline {baseline_epochs:g} epochs: {cur.speedup(epochs, baseline_epochs):.2f}x (pixel cost)")
    if flops:
        lines.append(f"FLOP-based speedup vs baseline {baseline_epochs:g} epochs: {flops['speedup']:.2f}x "
                     f"({flops['model']}, {flops['rule']}; training FLOPs per sample, forward + backward: "
                     f"{flops['per_sample'][str(cur.final_size)] / 1e9:.2f} GFLOP at {cur.final_size})")
    return "\n".join(lines)


def model_flops(cur: Curriculum, epochs: float, baseline_epochs: float, model: str) -> Dict[str, Any]:
    """Training FLOPs per sample of the timm ``model`` at every stage size, prepared as the official
    code trains it (engine.flops.timm_builder), and the saving they give the plan. Imports timm
    only here: the curriculum library itself does not need it."""
    from engine.flops import flop_ratios, flop_saving, flops_per_sample, is_swin, timm_builder

    per_size = flops_per_sample(timm_builder(model), [st.size for st in cur.stages],
                                log=lambda m: print(m, file=sys.stderr))
    rule = ("Swin: img_size = size, window_size = size // 32" if is_swin(model)
            else "built for each size (img_size = size where the model takes it)")
    return {"model": model, "rule": rule,
            "per_sample": {str(s): v for s, v in per_size.items()},
            "ratio": {str(s): r for s, r in flop_ratios(per_size, cur.final_size).items()},
            "speedup": flop_saving(cur, epochs, baseline_epochs, per_size)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efficienttrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in curricula")
    show = sub.add_parser("show", help="print a curriculum's stage table")
    show.add_argument("name", help=f"built-in name ({', '.join(BUILTIN)}) or a YAML file")
    show.add_argument("--epochs", type=float, default=None,
                      help="budget: epochs (epochs mode, default 300) or equivalent epochs (compute mode, default 200)")
    show.add_argument("--baseline-epochs", type=float, default=300.0, help="baseline for the speedup (default 300)")
    show.add_argument("--final-size", type=int, default=224)
    show.add_argument("--multiple-of", type=int, default=DEFAULT_MULTIPLE_OF,
                      help=f"round sizes to multiples of this (patch size; 32 for ConvNets; default {DEFAULT_MULTIPLE_OF})")
    show.add_argument("--json", action="store_true", help="print JSON instead of a text table")
    show.add_argument("--plot", metavar="FILE.png", help="also write a plot of size and magnitude vs progress")
    show.add_argument("--model", metavar="TIMM_NAME",
                      help="also count this timm model's training FLOPs at every stage size (ViT/DeiT built with "
                           "img_size=size, Swin with img_size=size and window_size=size // 32, ConvNets as is) "
                           "and print the FLOP-based speedup beside the pixel one")
    search = sub.add_parser("search", help="find a curriculum with short proxy training runs (EfficientTrain "
                                           "Algorithm 1 or the EfficientTrain++ compute-constrained search)")
    search.add_argument("proxy", help="proxy YAML (see configs/search/ and evaluation/search_runner.py)")
    search.add_argument("overrides", nargs="*", help="key=value overrides of the proxy, e.g. budget=8 stages=4")
    search.add_argument("--output", metavar="DIR", help="output folder (default: the proxy's output_dir, else "
                                                        "runs/search/<name>); rerunning continues the search there")
    args = parser.parse_args(argv)

    if args.command == "search":
        # the proxy runner trains models: imported only here, the curriculum library does not need it
        from engine.errors import run_cli
        from evaluation.search_runner import main_search

        command = " ".join(["python -m efficienttrain", *(sys.argv[1:] if argv is None else argv)])
        return run_cli(lambda: main_search(args.proxy, args.overrides, args.output, command))
    if args.command == "list":
        for name, fn in BUILTIN.items():
            cur = fn()
            print(f"{name:<15} {cur.budget:<8} {' '.join(str(s.size) for s in cur.stages):<42} {cur.description}")
        return 0
    try:
        cur = get_curriculum(args.name, final_size=args.final_size, multiple_of=args.multiple_of)
        epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[cur.budget]
        flops = None
        if args.model:
            from engine.flops import FlopsError

            try:
                flops = model_flops(cur, epochs, args.baseline_epochs, args.model)
            except FlopsError as e:
                print(f"error: --model {args.model}: {e}", file=sys.stderr)
                return 2
        if args.json:
            table = cur.table(epochs)
            if flops:
                for row in table:
                    row["flops_ratio"] = flops["ratio"][str(row["size"])]
            print(json.dumps({
                **cur.to_dict(), "epochs": epochs, "baseline_epochs": args.baseline_epochs,
                "compute": cur.compute(epochs), "speedup": cur.speedup(epochs, args.baseline_epochs),
                **({"flops": flops} if flops else {}), "table": table}, indent=2))
        else:
            print(format_table(cur, epochs, args.baseline_epochs, flops))
        if args.plot:
            plot_curriculum(cur, args.plot, epochs, args.baseline_epochs)
            print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    except CurriculumError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
