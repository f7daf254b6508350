"""What every training entry point (``python -m pretrain``, ``python -m finetune``) does around
the loop: start the process group, seed, settle the global batch, open the run directory and its
``log.txt``, find (and check) the checkpoint a run continues from, write the run's record files
(resolved config with the command and git commit, curriculum plan and plot), and the command line
itself (``--help``, ``--print-config``, ``--dry-run``, exit codes)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TextIO, Type

import torch
import yaml

from efficienttrain.curriculum import Curriculum, Plan
from efficienttrain.plot import plot_curriculum

from .config import load_config, save_config, to_dict
from .config_doc import sections_summary
from .distributed import DistInfo, barrier, cleanup, describe_environment, init_distributed
from .errors import USER_ERRORS, run_cli
from .resume import Resume, check_plan_steps, find_resume, flatten
from .stops import RunDirBusy, RunLock, Stopped, StopSignals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class RunOptions:
    """How the command line asked for the run: ``dry_run`` (check everything, print the plan,
    train nothing, write nothing) and the command, recorded beside the resolved config."""

    dry_run: bool = False
    command: str = ""


class _Tee:
    """A text stream that also appends to the run's ``log.txt`` (progress-bar redraws excluded)."""

    def __init__(self, stream: TextIO, log: TextIO, skip_redraws: bool) -> None:
        self.stream, self.log, self.skip_redraws = stream, log, skip_redraws
        self._after_redraw = False

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        redraw = self.skip_redraws and "\r" in text
        if not (redraw or (self._after_redraw and text == "\n")):   # a bar's closing newline goes too
            self.log.write(text)
            self.log.flush()
        self._after_redraw = redraw
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def git_commit(path: str = REPO) -> str:
    """``<sha>`` (``+dirty`` with uncommitted changes) of the checkout holding the code, or why not."""
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git is not available)"


class Run:
    """One invocation of a training entry point, as a context manager.

    On entry: process group, seeds (per rank), ``train.per_gpu_batch_size`` turned into the global
    ``train.batch_size``, the SIGINT / SIGTERM handlers (``signals``: the trainer asks them at step
    boundaries), the run directory's lock (rank 0, taken before anything is written; every rank
    stops when another live run holds it) and (rank 0, not in a dry run) ``log.txt`` receiving
    everything printed. On exit: the error (if any) is appended to ``log.txt``, the streams are
    restored, the lock released, the handlers restored and the process group torn down."""

    def __init__(self, cfg: Any, run_name: str, opts: Optional[RunOptions] = None) -> None:
        self.cfg, self.opts = cfg, opts or RunOptions()
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.log: Callable[..., None] = print if self.dist.is_main else (lambda *a, **k: None)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        random.seed(cfg.train.seed + self.dist.rank)
        self.dir = os.path.abspath(cfg.train.output_dir or os.path.join("runs", run_name))
        cfg.train.output_dir = self.dir      # the saved config names its run (--config run/config.yaml resumes it)
        self.resume: Optional[Resume] = None
        self._log_file: Optional[TextIO] = None
        self._streams = (sys.stdout, sys.stderr)
        self.global_batch = settle_batch_size(cfg.train, self.dist.world_size)
        self.signals = StopSignals()
        self.lock: Optional[RunLock] = None

    def __enter__(self) -> "Run":
        self.signals.install()
        try:
            self._take_lock()
        except BaseException:
            self.signals.restore()
            cleanup(self.dist)
            raise
        if self.dist.is_main and not self.opts.dry_run:
            self._log_file = open(os.path.join(self.dir, "log.txt"), "a", encoding="utf-8")
            self._log_file.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')} "
                                 f"{self.opts.command or '(called from Python)'}\n")
            sys.stdout = _Tee(sys.stdout, self._log_file, skip_redraws=False)
            sys.stderr = _Tee(sys.stderr, self._log_file, skip_redraws=True)
        self.log(f"run directory: {self.dir}" + (" (dry run: nothing is written)" if self.opts.dry_run else ""))
        self.log(describe_environment(self.dist.device))
        if self.lock is not None and self.lock.notice:
            self.log(self.lock.notice)
        if self.opts.dry_run and self.dist.is_main:
            holder = RunLock.holder(self.dir)
            if holder:
                self.log(f"note: a live run holds {self.dir} ({holder}); a real run started now would exit 2")
        self.log(self.global_batch)
        return self

    def _take_lock(self) -> None:
        """Rank 0 takes the directory's lock; every rank learns whether it could (one all-reduce)."""
        if self.opts.dry_run:
            return
        busy: Optional[RunDirBusy] = None
        if self.dist.is_main:
            try:
                self.lock = RunLock(self.dir, self.opts.command).acquire()
            except RunDirBusy as e:
                busy = e
        if self.dist.enabled:
            flag = torch.tensor([float(busy is not None)], device=self.dist.device)
            torch.distributed.all_reduce(flag)
            if busy is None and flag.item() > 0:
                busy = RunDirBusy(f"{self.dir} is in use by another live run (rank 0 says which)")
        if busy is not None:
            raise busy

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._log_file is not None:
            if exc is not None:
                import traceback

                text = (f"error: {exc}\n" if isinstance(exc, USER_ERRORS) else f"stopped: {exc}\n"
                        if isinstance(exc, (Stopped, KeyboardInterrupt)) else "".join(
                            traceback.format_exception(exc_type, exc, tb)))
                self._log_file.write(text)
            sys.stdout, sys.stderr = self._streams
            self._log_file.close()
            self._log_file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.signals.restore()
        cleanup(self.dist)

    def find_resume(self, config: Dict[str, Any]) -> Optional[Resume]:
        """The checkpoint this run continues from, loaded and checked against ``config`` (the
        resolved config as a dict) before anything expensive happens; None for a fresh start."""
        self.resume = find_resume(self.cfg.train, self.dir, config)
        if self.resume is not None:
            pos = self.resume.state["meta"]["position"]
            accepted = self.resume.accepted
            self.log(f"{'would resume' if self.opts.dry_run else 'resuming'} from {self.resume.path} "
                     f"(step {pos['step']}/{pos['total_steps']}); "
                     + ("its settings match this config" if not accepted else
                        "settings changed, accepted by train.resume_allow: " + "; ".join(
                            f"{k}: {v0!r} -> {v1!r}" for k, v0, v1 in accepted)))
        return self.resume

    def demo_data_ready(self, exists: Callable[[], bool], generate: Callable[[], Any], path: str,
                        check: Optional[Callable[[], str]] = None,
                        notice: Optional[Callable[[str], str]] = None) -> bool:
        """``data.demo=true``: rank 0 generates the demo set (a no-op when it is there) and every rank
        waits for it; True. A dry run writes nothing: False (said in the log) when the set is missing,
        since the plan needs the data. ``check()`` is the generator's verdict without writing
        (``"ready"``, ``"missing"``, ``"regenerate"``; a path it would refuse raises, on every rank
        and in a dry run alike, so a dry run fails where the real run would); ``notice(verdict)``
        is the dry run's line saying what the real run would write."""
        if check is not None:
            verdict = check()
            if self.opts.dry_run:
                if verdict != "ready":
                    self.log(f"{notice(verdict) if notice else f'dry run: data.demo=true: {verdict} {path}'}. "
                             "Everything before the data checks out; the plan needs the data, so it is not shown")
                    return False
                return True
            barrier(self.dist)        # every rank has its verdict before rank 0 writes (or removes) anything
        if self.opts.dry_run:
            if not exists():
                self.log(f"dry run: data.demo=true and the demo set is not generated yet ({path}); the first real "
                         "run writes it. Everything before the data checks out; the plan needs the data, so it is "
                         "not shown")
                return False
            return True
        if self.dist.is_main:
            generate()
        barrier(self.dist)
        return True

    def check_plan(self, plan: Plan) -> None:
        """Once the data is scanned: a resumed run's plan must have the checkpoint's length."""
        if self.resume is not None:
            check_plan_steps(self.resume, plan.total_steps, plan.dataset_size)

    def write_files(self, cur: Curriculum, plan: Plan, savings: Optional[Dict[str, Any]] = None) -> None:
        """Rank 0's record of the run: the resolved config (``config.yaml``; a resumed run writes
        ``config.resume-N.yaml`` beside it, never over it) headed by the command and git commit,
        ``curriculum.png`` and ``plan.json`` (with the planned saving by pixels and by the model's
        FLOPs, ``savings``, when measured)."""
        if not self.dist.is_main or self.opts.dry_run:
            return
        cfg = self.cfg
        name = "config.yaml"
        if self.resume is not None and os.path.isfile(os.path.join(self.dir, name)):
            n = 1
            while os.path.exists(os.path.join(self.dir, f"config.resume-{n}.yaml")):
                n += 1
            name = f"config.resume-{n}.yaml"
        header = [f"command: {self.opts.command or '(called from Python)'}", f"git: {git_commit()}",
                  f"written: {datetime.datetime.now().isoformat(timespec='seconds')}"]
        if self.resume is not None:
            header.append(f"resumed from: {self.resume.path} at step {self.resume.state['meta']['position']['step']}")
        save_config(cfg, os.path.join(self.dir, name), header=header)
        baseline = cfg.curriculum.baseline_epochs or cfg.curriculum.epochs
        plot_curriculum(cur, os.path.join(self.dir, "curriculum.png"), cfg.curriculum.epochs, baseline)
        with open(os.path.join(self.dir, "plan.json"), "w") as f:
            json.dump({"curriculum": cur.to_dict(), "budget_epochs": plan.epochs, "dataset_size": plan.dataset_size,
                       "planned_saving": savings, "rows": plan.rows()}, f, indent=2)


def settle_batch_size(train: Any, world_size: int) -> str:
    """Set ``train.batch_size`` from ``train.per_gpu_batch_size`` when given (MAE / timm count per
    process and micro-step) and return the line that says how the global batch splits."""
    if train.per_gpu_batch_size is not None:
        train.batch_size = train.per_gpu_batch_size * world_size * train.accum_steps
    per = train.batch_size / (world_size * train.accum_steps)
    per_txt = f"{int(per)}" if per == int(per) else f"{per:g} (not a whole number: see the error below)"
    return (f"global batch {train.batch_size} = {per_txt} per process x {world_size} process(es) x "
            f"{train.accum_steps} accumulation step(s)" +
            (" (from train.per_gpu_batch_size)" if train.per_gpu_batch_size is not None else ""))


# MAE / timm / DeiT flags a user types out of habit, and the key that does the same here
_HABIT_FLAGS = {
    "output_dir": "train.output_dir", "log_dir": "train.output_dir", "resume": "train.resume",
    "batch_size": "train.per_gpu_batch_size", "accum_iter": "train.accum_steps", "epochs": "curriculum.epochs",
    "warmup_epochs": "train.warmup_epochs", "blr": "train.blr", "lr": "train.lr", "min_lr": "train.min_lr",
    "weight_decay": "train.weight_decay", "clip_grad": "train.clip_grad", "seed": "train.seed",
    "device": "train.device", "num_workers": "data.num_workers", "data_path": "data.path",
    "input_size": "model.img_size", "mask_ratio": "model.mask_ratio", "model": "model.arch",
    "finetune": "model.checkpoint", "nb_classes": "model.num_classes", "drop_path": "model.drop_path",
    "layer_decay": "model.layer_decay", "smoothing": "data.smoothing", "mixup": "data.mixup",
    "cutmix": "data.cutmix", "reprob": "data.reprob", "global_pool": "model.global_pool",
}
_HABIT_SPECIAL = {
    "norm_pix_loss": "model.target=norm_pixel", "eval": "mode=eval",
    "start_epoch": "nothing: a resumed run continues at its checkpoint's step",
    "dist_eval": "nothing: evaluation is always sharded over the processes",
    "pin_mem": "nothing: pinned memory is on whenever it helps",
    "local_rank": "nothing: start several processes with torchrun (or --nproc N in tools/*.sh), which sets LOCAL_RANK",
}


def _flag_hint(schema: Type, flag: str, value: Optional[str]) -> str:
    """The message for an unknown ``--flag``: the config key it probably means, or what exists."""
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    keys = set(_all_keys(schema))
    target = _HABIT_FLAGS.get(name)
    if name == "model" and "model.name" in keys:
        target = "model.name"
    if target in keys:
        return (f"{flag} is not an option here: settings are config keys given as key=value; use "
                f"{target}={value if value is not None else '...'}")
    if name in _HABIT_SPECIAL:
        return f"{flag} is not an option here; use {_HABIT_SPECIAL[name]}"
    if name in keys or any(k.endswith("." + name) for k in keys):
        match = name if name in keys else next(k for k in sorted(keys) if k.endswith("." + name))
        return f"{flag} is not an option here: settings are config keys given as key=value; use {match}=..."
    return (f"unknown option {flag}; options: --config, --print-config, --dry-run, -h/--help; settings are "
            f"key=value overrides (see --help for the sections and docs/config.md for every key)")


def _all_keys(schema: Type) -> List[str]:
    return list(flatten(to_dict(schema())))


def cli_main(prog: str, description: str, schema: Type, run: Callable[..., Dict], default_name: str,
             config_help: str, overrides_help: str, argv: Optional[List[str]] = None) -> int:
    """``prog --config CONFIG [--print-config | --dry-run] [key=value ...]``: load and check the
    config, then ``run(cfg, name, RunOptions)`` (name: the config file's stem). Exit 2 with the
    message on a user error (see engine.errors), 1 when training stopped on a non-finite loss."""
    ap = argparse.ArgumentParser(
        prog=prog, description=textwrap.fill(description.replace("``", ""), width=100),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="config sections and their keys (set any of them as key=value, e.g. train.blr=1e-4):\n"
               + sections_summary(schema))
    ap.add_argument("--config", help=config_help)
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file + overrides, checked) as YAML and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="check everything (config, curriculum, batch splits, resume checkpoint, data), print "
                         "the plan and exit without training or writing anything")
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = ap.parse_known_intermixed_args(argv)   # options and key=value overrides in any order
    if unknown:
        flag = unknown[0]
        i = argv.index(flag)
        value = flag.split("=", 1)[1] if "=" in flag else (
            argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None)
        print(f"{prog}: error: {_flag_hint(schema, flag, value)}", file=sys.stderr)
        return 2
    command = " ".join([prog, *map(shlex.quote, argv)])
    command += f"  (in {os.getcwd()})"
    stray = [a for a in args.overrides if "=" not in a and a.endswith((".yaml", ".yml"))]
    if stray:
        print(f"{prog}: error: {stray[0]!r} is not a key=value override; give a config file as --config {stray[0]}",
              file=sys.stderr)
        return 2

    def main() -> None:
        cfg = load_config(schema, args.config, args.overrides)
        if args.print_config:
            settle_batch_size(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))   # as the run will
            print(f"# {command}")
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return
        name = os.path.splitext(os.path.basename(args.config))[0] if args.config else default_name
        run(cfg, name, RunOptions(dry_run=args.dry_run, command=command))

    return run_cli(main)

