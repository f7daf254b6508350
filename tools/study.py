#!/usr/bin/env python
"""Run a study: train and evaluate every arm (curriculum, budget, seed) of a recipe and compare
them (measured wall time and speedup, planned compute, kNN / probe / fine-tune accuracy).

    python tools/study.py configs/study/imagenette64_cpu.yaml            # run, resume, report
    python tools/study.py configs/study/imagenette64_cpu.yaml --only etpp-3x
    python tools/study.py configs/study/imagenette64_cpu.yaml output_dir=runs/study/try2

Finished arms are skipped and an interrupted one is resumed, so rerunning the same command after
a stop continues the study. Outputs: output_dir/study.{md,json,png} and one run folder per arm.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engine.config import load_config  # noqa: E402
from engine.errors import run_cli  # noqa: E402
from evaluation.study import StudyConfig, run_study  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", help="study YAML (see configs/study/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the study, e.g. seeds=[0,1]")
    ap.add_argument("--only", action="append", help="run only this arm (repeatable); the report waits for all")
    args = ap.parse_args()

    def main_() -> None:
        study = load_config(StudyConfig, args.study, args.overrides)
        run_study(study, " ".join(["python", "tools/study.py", *sys.argv[1:]]), only=args.only)

    return run_cli(main_)


if __name__ == "__main__":
    sys.exit(main())
