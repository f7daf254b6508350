"""Command line: ``python -m efficienttrain show NAME`` prints a curriculum's stage table.

Examples::

    python -m efficienttrain list
    python -m efficienttrain show etpp epochs=200
    python -m efficienttrain show et epochs=300 final_size=384 multiple_of=32 json=true
    python -m efficienttrain show etpp --epochs 200          # the --flags are aliases of the keys
    python -m efficienttrain show my_curriculum.yaml --plot curriculum.png

The library's own commands only: it knows no model and trains nothing. The commands that need the
training engine live in the driver layer, :mod:`evaluation.curriculum` (the same ``list`` and
``show``, plus ``show --model`` and ``search``)::

    python -m evaluation.curriculum show etpp --epochs 200 --model swin_tiny_patch4_window7_224
    python -m evaluation.curriculum search configs/search/demo_etpp.yaml [--output DIR] [key=value ...]

Given those here, ``python -m efficienttrain`` says where they went and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional

from .curriculum import BUILTIN, DEFAULT_MULTIPLE_OF, Curriculum, CurriculumError, get_curriculum
from .plot import plot_curriculum

DEFAULT_EPOCHS = {"epochs": 300.0, "compute": 200.0}


def format_table(cur: Curriculum, epochs: float, baseline_epochs: float,
                 flops: Optional[Dict[str, Any]] = None) -> str:
    """The stage table; with ``flops`` (:func:`evaluation.curriculum.model_flops`) two more columns (a sample's pixel and
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


DRIVER = "python -m evaluation.curriculum"   # show --model and search: they need the training engine


SHOW_KEYS: Dict[str, type] = {"epochs": float, "baseline_epochs": float, "final_size": int, "multiple_of": int,
                              "json": bool, "plot": str}


def apply_settings(args: argparse.Namespace, items: List[str], keys: Dict[str, type] = SHOW_KEYS) -> Optional[str]:
    """``show``'s ``key=value`` settings (``epochs=200``), the same as its ``--flags`` (a key=value
    wins), set on ``args``; the error line for an item that is not one, else None."""
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in keys:
            return (f"error: {item!r} is not a setting of show; settings (key=value, or the same --flags): "
                    + ", ".join(keys))
        tp = keys[key]
        try:
            if tp is bool:
                if raw.lower() not in ("true", "false"):
                    raise ValueError
                value: Any = raw.lower() == "true"
            else:
                value = tp(raw)
        except ValueError:
            return f"error: {key}={raw}: expected {'true or false' if tp is bool else 'an integer' if tp is int else 'a number'}"
        setattr(args, key, value)
    return None


def add_commands(sub: Any) -> Dict[str, argparse.ArgumentParser]:
    """The ``list`` and ``show`` sub-commands (the driver adds ``show --model`` and ``search``)."""
    sub.add_parser("list", help="list the built-in curricula")
    show = sub.add_parser("show", help="print a curriculum's stage table",
                          usage="%(prog)s NAME [key=value ...]",
                          epilog="settings are key=value after NAME (epochs=200 final_size=384 json=true "
                                 "plot=FILE.png ...); the --flags above are their aliases")
    show.add_argument("name", help=f"built-in name ({', '.join(BUILTIN)}) or a YAML file")
    show.add_argument("--epochs", type=float, default=None,
                      help="budget: epochs (epochs mode, default 300) or equivalent epochs (compute mode, default 200)")
    show.add_argument("--baseline-epochs", type=float, default=300.0, help="baseline for the speedup (default 300)")
    show.add_argument("--final-size", type=int, default=224)
    show.add_argument("--multiple-of", type=int, default=DEFAULT_MULTIPLE_OF,
                      help=f"round sizes to multiples of this (patch size; 32 for ConvNets; default {DEFAULT_MULTIPLE_OF})")
    show.add_argument("--json", action="store_true", help="print JSON instead of a text table")
    show.add_argument("--plot", metavar="FILE.png", help="also write a plot of size and magnitude vs progress")
    return {"show": show}


def list_curricula() -> int:
    for name, fn in BUILTIN.items():
        cur = fn()
        print(f"{name:<15} {cur.budget:<8} {' '.join(str(s.size) for s in cur.stages):<42} {cur.description}")
    return 0


def show(args: argparse.Namespace,
         model_flops: Optional[Callable[[Curriculum, float], Optional[Dict[str, Any]]]] = None) -> int:
    """``show``: the table (or JSON) and the plot. ``model_flops(cur, epochs)``, when given, returns
    the FLOP columns of :func:`format_table` (the driver passes it for ``--model``)."""
    try:
        cur = get_curriculum(args.name, final_size=args.final_size, multiple_of=args.multiple_of)
        epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[cur.budget]
        flops = model_flops(cur, epochs) if model_flops else None
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


def moved(argv: List[str]) -> Optional[str]:
    """The line that sends a command needing the engine (``search``, ``show --model``) to the
    driver, or None."""
    if argv[:1] == ["search"]:
        why = "the search trains proxy models"
    elif argv[:1] == ["show"] and any(a == "--model" or a.startswith(("--model=", "model=")) for a in argv):
        why = "counting a model's FLOPs builds it with the training engine"
    else:
        return None
    return f"error: python -m efficienttrain {argv[0]}: {why}, so it runs from the driver layer: {DRIVER} {' '.join(argv)}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pointer = moved(argv)
    if pointer:
        print(pointer, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m efficienttrain",
                                     description="The EfficientTrain curriculum library's own commands: list the "
                                                 "built-in curricula, show a curriculum's stage table.",
                                     epilog=f"show --model and search: {DRIVER} (they need the training engine)")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(argv)
    error = apply_settings(args, extra) if args.command == "show" else (
        f"error: unrecognized arguments: {' '.join(extra)}" if extra else None)
    if error:
        print(error, file=sys.stderr)
        return 2
    if args.command == "list":
        return list_curricula()
    return show(args)


if __name__ == "__main__":
    sys.exit(main())
