"""What every training entry point (``python -m pretrain``, ``python -m finetune``) does around
the loop: start the process group, seed, pick the run directory, write the run's record files
(resolved config, curriculum plan and plot) and turn user errors into exit codes."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch

from efficienttrain.curriculum import Curriculum, CurriculumError, Plan
from efficienttrain.plot import plot_curriculum

from .config import ConfigError, load_config, save_config
from .data import DataError
from .distributed import DistInfo, init_distributed
from .trainer import NonFiniteLossError


def start_run(cfg: Any, run_name: str) -> Tuple[DistInfo, Callable[..., None], str]:
    """(dist info, a ``print`` that only rank 0 executes, absolute run directory) for ``cfg``
    (a config with a ``train`` section: device, seed, output_dir); seeds torch and ``random``
    per rank."""
    dist = init_distributed(cfg.train.device)
    log = print if dist.is_main else (lambda *a, **k: None)
    torch.manual_seed(cfg.train.seed + dist.rank)
    random.seed(cfg.train.seed + dist.rank)
    run_dir = os.path.abspath(cfg.train.output_dir or os.path.join("runs", run_name))
    return dist, log, run_dir


def write_run_files(cfg: Any, cur: Curriculum, plan: Plan, run_dir: str) -> float:
    """Rank 0's record of a run: ``config.yaml`` (resolved), ``curriculum.png`` and ``plan.json``.
    Returns the baseline epochs the plot compares against (``curriculum.baseline_epochs`` or the
    budget)."""
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    baseline = cfg.curriculum.baseline_epochs or cfg.curriculum.epochs
    plot_curriculum(cur, os.path.join(run_dir, "curriculum.png"), cfg.curriculum.epochs, baseline)
    with open(os.path.join(run_dir, "plan.json"), "w") as f:
        json.dump({"curriculum": cur.to_dict(), "budget_epochs": plan.epochs, "dataset_size": plan.dataset_size,
                   "rows": plan.rows()}, f, indent=2)
    return baseline


def cli_main(prog: str, description: str, schema: Type, run: Callable[[Any, str], Dict], default_name: str,
             config_help: str, overrides_help: str, argv: Optional[List[str]] = None,
             user_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """``prog --config CONFIG [key=value ...]``: load and check the config, ``run(cfg, name)``
    (name: the config file's stem). Exit 2 with the message on bad input (config, curriculum,
    missing files and ``user_errors``), 1 when training stopped on a non-finite loss."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help=config_help)
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        name = os.path.splitext(os.path.basename(args.config))[0] if args.config else default_name
        run(cfg, name)
    except (ConfigError, CurriculumError, DataError, FileNotFoundError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
