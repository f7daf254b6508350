"""Command line: the curriculum commands that need the training engine, beside the library's own.

    python -m evaluation.curriculum list
    python -m evaluation.curriculum show etpp epochs=200 [json=true] [plot=FILE.png]
    python -m evaluation.curriculum show etpp epochs=200 model=swin_tiny_patch4_window7_224
    python -m evaluation.curriculum search configs/search/demo_etpp.yaml [--output DIR] [key=value ...]

``list`` and ``show`` are ``python -m efficienttrain``'s (the pure library CLI,
:mod:`efficienttrain.__main__`); this driver adds what the library must not import:
``show --model`` (the timm model's training FLOPs at every stage size, :mod:`engine.flops`) and
``search`` (proxy training runs, :mod:`evaluation.search_runner`).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, Dict, List, Optional

from efficienttrain.__main__ import DRIVER, SHOW_KEYS, add_commands, apply_settings, list_curricula, show
from efficienttrain.curriculum import Curriculum
from engine.config_doc import keys_help
from engine.errors import run_cli
from engine.flops import FlopsError, flop_ratios, flop_saving, flops_per_sample, is_swin, timm_builder

from .search_runner import ProxyConfig, main_search


def model_flops(cur: Curriculum, epochs: float, baseline_epochs: float, model: str) -> Dict[str, Any]:
    """Training FLOPs per sample of the timm ``model`` at every stage size, prepared as the official
    code trains it (:func:`engine.flops.timm_builder`), and the saving they give the plan: the extra
    columns of :func:`efficienttrain.__main__.format_table`."""
    per_size = flops_per_sample(timm_builder(model), [st.size for st in cur.stages],
                                log=lambda m: print(m, file=sys.stderr))
    rule = ("Swin: img_size = size, window_size = size // 32" if is_swin(model)
            else "built for each size (img_size = size where the model takes it)")
    return {"model": model, "rule": rule,
            "per_sample": {str(s): v for s, v in per_size.items()},
            "ratio": {str(s): r for s, r in flop_ratios(per_size, cur.final_size).items()},
            "speedup": flop_saving(cur, epochs, baseline_epochs, per_size)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=DRIVER, description="The curriculum commands: list and show (as python -m "
                                                              "efficienttrain), show model=NAME (a timm model's "
                                                              "FLOPs per stage) and search (proxy training runs).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)["show"].add_argument(
        "--model", metavar="TIMM_NAME",
        help="also count this timm model's training FLOPs at every stage size (ViT/DeiT built with "
             "img_size=size, Swin with img_size=size and window_size=size // 32, ConvNets as is) "
             "and print the FLOP-based speedup beside the pixel one")
    search = sub.add_parser(
        "search", help="find a curriculum with short proxy training runs (EfficientTrain Algorithm 1 or the "
                       "EfficientTrain++ compute-constrained search)",
        description=textwrap.fill(
            "Find a curriculum with short proxy training runs: every trial is a python -m pretrain (or python -m "
            "finetune mode=train) run of the proxy's recipe with one candidate schedule, scored by kNN top-1 "
            "(pretrain) or validation top-1 (supervised). Rerunning the same command continues an interrupted "
            "search.", width=100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="proxy keys (set them in the proxy YAML or as key=value after it; key=default  meaning; name, config, "
               "data,\nbudget, stages and sizes have no usable default and must be set):\n"
               + keys_help(ProxyConfig)
               + "\n\nexamples:\n  " + DRIVER + " search configs/search/demo_etpp.yaml\n  " + DRIVER
               + " search configs/search/demo_et.yaml budget=8 stages=4 --output runs/search/try2")
    search.add_argument("proxy", help="proxy YAML (e.g. configs/search/demo_etpp.yaml; its keys are listed below)")
    search.add_argument("overrides", nargs="*", help="key=value overrides of the proxy, e.g. budget=8 stages=4")
    search.add_argument("--output", metavar="DIR", help="output folder (default: the proxy's output_dir, else "
                                                        "runs/search/<name>); rerunning continues the search there")
    args, extra = parser.parse_known_args(argv)
    error = apply_settings(args, extra, {**SHOW_KEYS, "model": str}) if args.command == "show" else (
        f"error: unrecognized arguments: {' '.join(extra)}" if extra else None)
    if error:
        print(error, file=sys.stderr)
        return 2

    if args.command == "search":
        command = " ".join([DRIVER, *(sys.argv[1:] if argv is None else argv)])
        stray = [o for o in args.overrides if "=" not in o]
        if stray:
            print(f"error: {stray[0]!r} is not a key=value override of the proxy (its keys: {DRIVER} search --help)",
                  file=sys.stderr)
            return 2
        return run_cli(lambda: main_search(args.proxy, args.overrides, args.output, command))
    if args.command == "list":
        return list_curricula()
    if not args.model:
        return show(args)
    try:
        return show(args, lambda cur, epochs: model_flops(cur, epochs, args.baseline_epochs, args.model))
    except FlopsError as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
