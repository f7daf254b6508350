"""The one training loop: asks the curriculum plan what every optimizer step looks like.

A job (MAE pretraining, fine-tuning) plugs in a model and a :class:`Task` (its data pipeline and
loss); the loop owns everything else: sample order and sharding, replay, LR, mixed precision,
accumulation, clipping, checkpoints and resume, metrics. A stage change is just the plan's answer
changing: the sample keys carry the new size, the replay buffer is emptied, the optimizer and the
loader (one for the whole run) are untouched.

No host-device synchronisation in a step that does not log: the loss is accumulated on the device
and read every ``log_every`` steps and before every checkpoint (where a non-finite loss stops the
run, so no checkpoint ever holds the state that followed one); checkpoints are written by a
background thread.

Data order: a single stream of sample positions 0, 1, 2, ...; position k is sample
``perm_e[k mod n]`` of data epoch ``e = k // n`` (a seeded permutation per epoch). Optimizer step
t of a stage consumes the next ``loader_batch_size`` positions, split across ranks and
accumulation micro-steps. Augmentation is seeded by the position, so a resumed run sees exactly
the samples (and crops) the uninterrupted run would have seen, whatever the worker count.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Protocol, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from efficienttrain.curriculum import Curriculum, Plan, PlannedStage, StepInfo, with_stage_accumulation
from efficienttrain.replay import ReplayBuffer, check_replay_memory, image_sample_bytes

from .checkpoint import CheckpointError, CheckpointWriter, atomic_save, atomic_write_json, save_checkpoint
from .config import ConfigError
from .distributed import DistInfo, all_reduce_sum_
from .ema import WeightEma
from .optim import no_weight_decay
from .plots import plot_eval_curve
from .resume import Resume, check_plan_steps, find_resume
from .speed import RunTiming, StageTiming, format_saving, measured_saving
from .stops import StepControl, Stopped, StopSignals, exit_code, signal_name


@dataclass
class TrainConfig:
    """Optimisation and run settings shared by every job."""

    batch_size: int = 4096                 # global samples per optimizer step (all ranks, all micro-steps)
    per_gpu_batch_size: Optional[int] = None   # MAE / timm style: samples per process per micro-step; when set,
                                           # batch_size = per_gpu_batch_size x processes x accum_steps
    accum_steps: int = 1                   # gradient-accumulation micro-steps per optimizer step
    blr: float = 1.5e-4                    # base LR; lr = blr * batch_size / 256 unless lr is set
    lr: Optional[float] = None             # absolute peak LR; overrides blr when set (null: blr * batch_size / 256)
    min_lr: float = 0.0                    # LR at the end of the cosine decay (the schedule's floor)
    warmup_epochs: Optional[float] = 40.0  # linear LR warmup from 0, in budget epochs; then cosine decay to min_lr
                                           # (null: set by the job's recipe, e.g. fine-tuning's recipe: official)
    weight_decay: float = 0.05             # AdamW / LARS weight decay (none on norms, biases, tokens, pos. embeddings)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])   # AdamW (beta1, beta2)
    clip_grad: Optional[float] = None      # max gradient norm before each optimizer step (null: no clipping)
    amp: str = "auto"                      # auto (bf16 on capable GPUs, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False                  # torch.compile the model (static shapes: one graph per curriculum size)
    compile_backend: str = "inductor"      # torch.compile backend (inductor; eager / aot_eager to debug)
    compile_mode: str = "default"          # inductor mode: default | reduce-overhead (CUDA graphs: removes the launch
                                           # cost that dominates small stages) | max-autotune | max-autotune-no-cudagraphs
    compile_recompile_limit: Optional[int] = None   # graphs per compiled frame (default: fits the curriculum)
    accum_by_stage: bool = True            # fewer micro-steps (a larger per-process batch) in stages with smaller
                                           # inputs, as long as a micro-batch holds no more pixels than at the final size
    seed: int = 0                          # random seed: model init, sample order, crops and augmentation
    device: str = "auto"                   # auto (the local GPU if CUDA is available, else cpu) | cpu | cuda | cuda:N
    output_dir: str = ""                   # run directory (default: runs/<config name>)
    resume: str = "auto"                   # auto (continue from output_dir if possible) | never | path to a checkpoint
    resume_allow: List[str] = field(default_factory=list)  # keys (or sections) a resume may change beyond the
                                           # always-allowed ones (logging, workers, max_steps, ...), e.g. [train.blr]
    save_every_steps: int = 0              # also checkpoint every N steps (0: only at stage ends and the end)
    save_every_minutes: float = 10.0       # also checkpoint once this many minutes passed since the last checkpoint
                                           # (0: off): bounds the work a hard kill loses (SIGINT / SIGTERM save at once)
    eval_every_steps: int = 0              # tasks that evaluate: also every N steps (always at stage ends and the end)
    keep_last: int = 3                     # numbered checkpoints kept (besides latest and best); 0: all
    log_every: int = 10                    # log loss, LR, images/s (metrics.jsonl, TensorBoard, bar) every N steps
    max_steps: Optional[int] = None        # stop early after this many optimizer steps (debugging, tests)
    ema_decay: float = 0.0                 # EMA of the weights after every optimizer step (0: off; official ConvNeXt
                                           # 0.9999, CSWin 0.9998): saved as model_ema in every checkpoint
    ema_eval: bool = True                  # evaluate the EMA weights at every evaluation (logged as ema_*) and keep
                                           # checkpoint-best-ema.pth (its model entry holds the EMA weights)
    progress: bool = True                  # progress on the main process: a tqdm bar when stderr is a terminal, else
                                           # a plain line (step, loss, img/s, ETA) about every 30 s (false: neither)

    def validate(self, where: str) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"{where}.amp: {self.amp!r} is not allowed; allowed: auto, bf16, fp16, off")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError(f"{where}: batch_size and accum_steps must be >= 1, got batch_size={self.batch_size}, "
                              f"accum_steps={self.accum_steps}")
        if self.per_gpu_batch_size is not None and self.per_gpu_batch_size < 1:
            raise ConfigError(f"{where}.per_gpu_batch_size must be >= 1 (or null), got {self.per_gpu_batch_size}")
        if len(self.betas) != 2:
            raise ConfigError(f"{where}.betas must be two numbers, got {self.betas}")
        for key, low in (("log_every", 1), ("keep_last", 0), ("save_every_steps", 0), ("eval_every_steps", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{where}.{key} must be >= {low}, got {getattr(self, key)}")
        for key in ("blr", "lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad"):
            value = getattr(self, key)
            if value is not None and (value < 0 or (value == 0 and key in ("blr", "lr", "clip_grad"))):
                raise ConfigError(f"{where}.{key} must be {'> 0' if key in ('blr', 'lr', 'clip_grad') else '>= 0'}"
                                  f"{' (or null)' if key in ('lr', 'clip_grad') else ''}, got {value}")
        if not self.save_every_minutes >= 0:
            raise ConfigError(f"{where}.save_every_minutes must be >= 0 (0: no timed checkpoints), "
                              f"got {self.save_every_minutes}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"{where}.compile_mode: {self.compile_mode!r} is not allowed; allowed: "
                              f"{', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(f"{where}.compile_mode={self.compile_mode} is a mode of the inductor backend; "
                              f"{where}.compile_backend is {self.compile_backend!r}: use compile_mode=default with it")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps must be >= 1 (or null: the whole plan), got {self.max_steps}")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ConfigError(f"{where}.ema_decay must be 0 (no weight EMA) or in (0, 1), e.g. 0.9999, "
                              f"got {self.ema_decay}")

    def check_budget(self, where: str, epochs: float) -> None:
        """The warmup (in budget epochs) must end inside the budget ``curriculum.epochs``."""
        if not epochs > 0:
            raise ConfigError(f"curriculum.epochs must be > 0 (the budget), got {epochs}")
        if self.warmup_epochs is None:
            raise ConfigError(f"{where}.warmup_epochs is null and nothing derives it; set a number of budget epochs "
                              "(or, for supervised training, recipe: official to take the official formula)")
        if self.warmup_epochs >= epochs:
            raise ConfigError(f"{where}.warmup_epochs={self.warmup_epochs:g} is not below curriculum.epochs={epochs:g} "
                              "(warmup is counted in budget epochs); allowed: 0 <= warmup_epochs < curriculum.epochs")

    def stage_accumulation(self, cur: Curriculum, world_size: int, replay_chunks: int) -> Curriculum:
        """``cur`` with each stage's accumulation set by ``accum_by_stage``
        (:func:`efficienttrain.curriculum.with_stage_accumulation`)."""
        if not self.accum_by_stage:
            return cur
        return with_stage_accumulation(cur, self.accum_steps, self.batch_size, world_size, replay_chunks)

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Prepared(NamedTuple):
    """A micro-batch ready for the model: device tensors (what the replay buffer stores) and the
    unreadable files skipped while preparing it (beyond those the loader counted)."""

    inputs: Tuple[torch.Tensor, ...]
    skipped: int = 0


class Task(Protocol):
    """What a job plugs into the loop."""

    def make_loader(self, batches: Iterable[List["SampleKey"]]) -> Iterable[Tuple[torch.Tensor, ...]]:
        """One loader for the whole run (``batches`` is a :class:`RunBatches`, or a list when a
        resumed run refills its replay buffer): yield a batch per list of sample keys (dataset
        index, stream position, magnitude, stage size); a tuple of CPU tensors whose last entry
        counts, per sample, the unreadable files skipped to produce it."""

    def prepare(self, batch: Tuple[torch.Tensor, ...], info: StepInfo) -> Prepared:
        """Move a loader batch (without its skip counts) to the device and apply the stage
        transform (decode, low-frequency crop, normalise): the model's inputs at the stage size."""

    def loss(self, model: nn.Module, inputs: Tuple[torch.Tensor, ...], info: StepInfo) -> torch.Tensor:
        """The loss of a prepared (possibly replayed) batch; runs under autocast."""

    def on_stage_end(self, model: nn.Module, stage: PlannedStage, run_dir: str) -> None:
        """Pictures or evaluations at the end of a stage (rank 0 only)."""

    def checkpoint_meta(self) -> Dict[str, Any]:
        """Metadata saved in every checkpoint (architecture, sizes, target, ...)."""

    # Optional: ``replay_dtypes`` (per prepared tensor, the dtype the replay buffer keeps it in),
    # ``replay_chunks`` (chunks per loader batch, default 32), ``on_stage_start(model, stage)``
    # (per-size model preparation), ``prepare_stage(model, stage, optimizer) -> bool`` (per-size
    # parameter surgery: replace parameters by new ones of the stage's shapes and move the
    # optimizer's references and state onto them; also called with optimizer None on the weight
    # EMA's copy, which must get the same shapes; True when it replaced any parameter or buffer,
    # then the loop builds DDP again. Called before ``on_stage_start`` at every stage start and,
    # on resume, before the checkpoint is loaded, so the model and optimizer have the
    # checkpoint's shapes), ``metrics() -> dict`` (extra numbers for the log), and
    # ``evaluate(model) -> dict`` with ``best_metric`` (a key of that dict, higher is better; read
    # at every evaluation, None: this evaluation does not compete): then evaluation runs at stage
    # ends (and every ``eval_every_steps``) and the best checkpoint is kept as ``checkpoint-best.pth``.
    # Optional, for tasks that change the model per step (progressive growth, engine/progressive.py):
    # ``before_step(model, info) -> StepInfo`` (once per optimizer step, before its micro-batches are
    # prepared; the returned info, e.g. another input size, is what prepare / loss / the log see),
    # ``after_step(model)`` (after every optimizer step, e.g. a momentum network's update),
    # ``state_dict() / load_state_dict(state)`` (saved in every checkpoint under "task"; on resume
    # restored before the checkpoint's stage is prepared), ``planned_speedup() -> float`` (the plan's
    # saving when the curriculum's pixel count does not tell it) and ``ddp_find_unused_parameters``
    # (True when some parameters get no gradient in a step).


def sample_index(position: int, n: int, seed: int, _cache: Dict = {}) -> int:
    """Dataset index at stream position ``position`` (one seeded permutation per data epoch)."""
    epoch = position // n
    key = (n, seed, epoch)
    if key not in _cache:
        if len(_cache) > 4:
            _cache.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _cache[key] = torch.randperm(n, generator=g).tolist()
    return _cache[key][position % n]


SampleKey = Tuple[int, int, float, int]   # (dataset index, stream position, magnitude, stage size)


class RunBatches:
    """This rank's micro-batches of sample keys from optimizer step ``first_step`` to the end of
    the run; lazy (a run spans hundreds of millions of samples). Used as the ``batch_sampler`` of
    ONE DataLoader for the whole run, so workers keep prefetching across stage changes (no
    worker restart, no drained pipeline). The augmentation magnitude and stage size travel with
    every key to transforms running in worker processes."""

    def __init__(self, plan: Plan, first_step: int, n: int, seed: int, dist: DistInfo) -> None:
        self.plan, self.first_step, self.n, self.seed = plan, first_step, n, seed
        self.world, self.rank = dist.world_size, dist.rank

    def stage_batches(self, ps: PlannedStage, first: int = 0) -> Iterator[List[SampleKey]]:
        """Micro-batches of stage ``ps`` from its step ``first``."""
        per_rank = ps.loader_batch_size // self.world
        micro = per_rank // ps.accum_steps
        stage_position = sum(p.steps * p.loader_batch_size for p in self.plan.stages[:ps.index])
        for t in range(first, ps.steps):
            base = stage_position + t * ps.loader_batch_size + self.rank * per_rank
            magnitude = ps.stage.magnitude_at(t / ps.steps)   # the step's augmentation strength
            for a in range(ps.accum_steps):
                start = base + a * micro
                yield [(sample_index(p, self.n, self.seed), p, magnitude, ps.stage.size)
                       for p in range(start, start + micro)]

    def max_micro_batch(self) -> int:
        """The largest micro-batch this rank loads (what loader workers keep in flight per batch)."""
        return max(ps.loader_batch_size // (self.world * ps.accum_steps) for ps in self.plan.stages)

    def __len__(self) -> int:
        return sum((ps.steps - max(0, self.first_step - ps.start_step)) * ps.accum_steps
                   for ps in self.plan.stages if ps.end_step > self.first_step)

    def __iter__(self) -> Iterator[List[SampleKey]]:
        for ps in self.plan.stages:
            if ps.end_step > self.first_step:
                yield from self.stage_batches(ps, max(0, self.first_step - ps.start_step))


PLAIN_PROGRESS_SECONDS = 30.0   # not on a terminal: a progress line at most this often (first and last log step too)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"   # tqdm's own ETA left out: the
# postfix's eta (from the budget consumed, as the plain lines give it) is the only one


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is a terminal: a bar only there; a
    redirected log gets plain lines instead of hundreds of redraws."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # no isatty, or a closed stream
        return False


def clock(seconds: float) -> str:
    """h:mm:ss."""
    h, rem = divmod(int(max(seconds, 0)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters (norms, biases) and on the model's
    ``no_weight_decay()`` names (tokens, position embeddings)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p, skip) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs a CUDA device (its loss scaler is CUDA's); this run is on {device}: "
                          "set train.amp=off (or bf16, or auto)")
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class NonFiniteLossError(FloatingPointError):
    pass


class CurriculumTrainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, plan: Plan, dist: DistInfo,
                 run_dir: str, config_dict: Dict[str, Any], dataset_size: int,
                 log: Callable[[str], None] = print,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 baseline_epochs: Optional[float] = None,
                 resume: Union[Resume, None, str] = "find",
                 signals: Optional[StopSignals] = None,
                 flops_ratio: Optional[Dict[str, float]] = None) -> None:
        """``resume``: the checkpoint an entry point already found and checked (``find_resume``),
        None to start fresh, or "find" to look for it here (``train.resume``). ``signals``: the run's
        SIGINT / SIGTERM handlers (engine.run.Run.signals); with them a signal saves the step it
        interrupted and raises :class:`engine.stops.Stopped`. ``flops_ratio``: the model's FLOPs per
        image at each size (str) relative to the final size, for the wall efficiency per stage."""
        self.cfg, self.task, self.plan, self.dist = cfg, task, plan, dist
        self.signals, self.flops_ratio = signals, flops_ratio
        self._resume = resume
        self.run_dir, self.config_dict, self.n = run_dir, config_dict, dataset_size
        self.baseline_epochs = baseline_epochs if baseline_epochs is not None else plan.epochs
        self.log = log if dist.is_main else (lambda msg: None)
        if cfg.compile and cfg.compile_mode == "reduce-overhead" and dist.device.type != "cuda":
            raise ConfigError(f"train.compile_mode=reduce-overhead captures CUDA graphs; this run is on {dist.device}: "
                              "use train.compile_mode=default (or train.compile=false)")
        self._cuda_graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
        self.model = model.to(dist.device)
        check_plan_fits(plan, dist.world_size, getattr(task, "replay_chunks", 32))   # fail before training
        self.replay_bytes = check_replay_memory(   # per process and replay stage; fails if a host cannot hold it
            plan, dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)),
            getattr(task, "replay_sample_bytes", image_sample_bytes))
        self._wrap()
        self.optimizer = optimizer or torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.base_lr(),
                                                        betas=tuple(cfg.betas), fused=True)
        self.dtype = amp_dtype(cfg, dist.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.step = 0
        self.bad_samples = 0
        self.best: Optional[float] = None
        self.last_eval: Dict[str, float] = {}
        self.replay: Optional[ReplayBuffer] = None
        self.timing = RunTiming()
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.writer = CheckpointWriter()
        self._metrics_file = None
        self._tb = None
        self._before_step = getattr(task, "before_step", None)     # optional per-step hooks (see Task)
        self._after_step = getattr(task, "after_step", None)
        # train.ema_decay: a float32 copy of the weights on the model's device, averaged after every optimizer step
        self.ema = WeightEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.best_ema: Optional[float] = None
        self.last_eval_ema: Dict[str, float] = {}
        self._ema_improved = False
        if self.ema is not None:
            evaluated = cfg.ema_eval and getattr(task, "evaluate", None) is not None
            self.log(f"EMA of weights: decay {cfg.ema_decay:g}, evaluated: {'yes' if evaluated else 'no'}")

    def _wrap(self) -> None:
        """DDP (several processes) and torch.compile around ``self.model``; done again after a
        task replaced parameters (DDP's reducer holds the parameters it was built with)."""
        dev = self.dist.device
        self.ddp = (nn.parallel.DistributedDataParallel(
            self.model, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(getattr(self.task, "ddp_find_unused_parameters", False)))
            if self.dist.enabled else self.model)
        self.forward_model = self._compiled(self.ddp) if self.cfg.compile else self.ddp

    def _prepare_stage(self, ps: PlannedStage) -> None:
        """The task's optional per-stage parameter surgery (see :class:`Task`); DDP is built again
        around the new parameters (a compiled single-process model just recompiles for them)."""
        prepare = getattr(self.task, "prepare_stage", None)
        changed = prepare is not None and prepare(self.model, ps, self.optimizer)
        if prepare is not None and self.ema is not None:
            self.ema.reshape(lambda m: prepare(m, ps, None), self.model)   # the same surgery; no optimizer
            if self.step == 0:
                self.ema.set(self.model)     # a run starts with EMA = model (tables drawn at the stage's shapes included)
        if changed and self.dist.enabled:
            self._wrap()
            import gc

            gc.collect()          # the replaced DDP wrapper sits in a reference cycle with its reducer's buckets

    # ---- torch.compile ---------------------------------------------------------------------------
    def shapes(self) -> List[Tuple[int, int]]:
        """Distinct (per-process micro-batch, input size) pairs the model sees: one compiled graph each."""
        return sorted({(ps.batch_size // (self.dist.world_size * ps.accum_steps), ps.stage.size) for ps in self.plan.stages})

    def _compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile`` with static shapes: a curriculum has a handful of input sizes, each
        compiled once; a recompile limit below that count would silently run the rest eagerly."""
        import torch._dynamo

        shapes = self.shapes()
        limit = self.cfg.compile_recompile_limit
        if limit is None:
            limit = max(8, len(shapes) + 2)      # + evaluation / picture shapes
        elif limit < len(shapes):
            warnings.warn(f"curriculum {self.plan.curriculum.name!r} trains at {len(shapes)} distinct (batch, size) "
                          f"shapes {shapes} but train.compile_recompile_limit={limit}: shapes beyond the limit run "
                          f"uncompiled (slow); raise train.compile_recompile_limit to at least {len(shapes)}")
        cfg = torch._dynamo.config
        cfg.recompile_limit = limit
        cfg.accumulated_recompile_limit = max(getattr(cfg, "accumulated_recompile_limit", 256), 4 * limit)
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        return torch.compile(module, dynamic=False, backend=self.cfg.compile_backend, mode=mode)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self, rng_ranks: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The whole training state; ``rng_ranks``: every rank's random generators, gathered by
        :meth:`save` (without them, this process's alone)."""
        return {
            "model": self.model.state_dict(),
            **({"model_ema": self.ema.state_dict(), "best_ema": self.best_ema,       # the official key
                "last_eval_ema": dict(self.last_eval_ema)} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "samples_seen": self.position_at(self.step),
            "bad_samples": self.bad_samples,
            "best": self.best,
            "last_eval": dict(self.last_eval),      # a resumed (or rerun finished) run keeps its results
            "timing": self.timing.state_dict(),
            "rng": rng_ranks[0] if rng_ranks else local_rng_state(self.dist.device),
            "rng_ranks": rng_ranks or [local_rng_state(self.dist.device)],   # entry r: rank r's generators
            "replay": self.replay.state_dict() if self.replay is not None else None,
            **({"task": self.task.state_dict()} if hasattr(self.task, "state_dict") else {}),
            "meta": {**self.task.checkpoint_meta(), "position": {
                "step": self.step, "total_steps": self.plan.total_steps,
                "stage": self.plan.at(min(self.step, self.plan.total_steps - 1)).stage_index,
                "budget_fraction": self.plan.budget_fraction(self.step)},
                "curriculum": self.plan.curriculum.to_dict(), "budget_epochs": self.plan.epochs,
                "config": self.config_dict},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("model_ema") is not None:
                self.ema.load_state_dict(state["model_ema"])
            elif self.ema is not None:       # EMA switched on by train.resume_allow: starts from the weights, as officially
                self.ema.set(self.model)
                self.log("the resume checkpoint has no model_ema: the weight EMA starts from its model weights")
        except (RuntimeError, ValueError, KeyError) as e:   # reached only when train.resume_allow let it through
            raise CheckpointError(f"the resume checkpoint's model or optimizer does not fit this run's "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0]}); a changed architecture "
                                  "cannot continue a run: use a new train.output_dir") from None
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.bad_samples = int(state.get("bad_samples", 0))
        self.best = state.get("best")
        self.last_eval = dict(state.get("last_eval") or {})
        self.best_ema = state.get("best_ema")
        self.last_eval_ema = dict(state.get("last_eval_ema") or {})
        self.timing.load_state_dict(state.get("timing"))
        self._restore_rng(state)
        self._resume_replay = state.get("replay")

    def _restore_rng(self, state: Dict[str, Any]) -> None:
        """This rank's generators as the checkpoint saved them for this rank; where it holds none
        for it (another process count, or a checkpoint written before per-rank states) they are
        derived from (seed, rank, step), and the log says so."""
        ranks = state.get("rng_ranks")
        if ranks is None and self.dist.world_size == 1:
            ranks = [state["rng"]]                  # a single-process run's (older) checkpoint
        if ranks is not None and len(ranks) == self.dist.world_size:
            set_local_rng_state(ranks[self.dist.rank], self.dist.device)
            return
        seed = (self.cfg.seed * 1_000_003 + self.step * 7919 + self.dist.rank * 104_729) % 2 ** 63
        torch.manual_seed(seed)
        random.seed(seed)
        self.log(f"the checkpoint holds the random states of {len(ranks) if ranks else 'only its first'} process(es), "
                 f"this run has {self.dist.world_size}: every rank's generators are derived from (seed, rank, step)")

    def position_at(self, step: int) -> int:
        """Stream position (samples consumed) before optimizer ``step``."""
        pos = 0
        for ps in self.plan.stages:
            if step <= ps.start_step:
                break
            pos += min(step - ps.start_step, ps.steps) * ps.loader_batch_size
        return pos

    def maybe_resume(self) -> bool:
        """Continue from the checkpoint ``train.resume`` names (settings checked by
        :func:`engine.resume.find_resume`); the plan must have the same steps (the dataset, which the
        settings cannot show, may not have changed size)."""
        res = find_resume(self.cfg, self.run_dir, self.config_dict) if self._resume == "find" else self._resume
        if res is None:
            return False
        check_plan_steps(res, self.plan.total_steps, self.n)
        # the checkpoint's parameters have the shapes of the stage its last step trained in (a
        # checkpoint at a stage end precedes the next stage's start, which interpolates them later)
        step = int(res.state["step"])
        if hasattr(self.task, "load_state_dict"):      # before the stage is prepared (e.g. growth decisions)
            self.task.load_state_dict(res.state.get("task"))
        self._prepare_stage(self.plan.stages[self.plan.at(min(max(step, 1), self.plan.total_steps) - 1).stage_index])
        self.load_state_dict(res.state)
        self.log(f"resumed from {res.path} at step {self.step}/{self.plan.total_steps}")
        return True

    def save(self, best: bool = False, ema: bool = False) -> None:
        """Checkpoint the current step (rank 0) on the background writer; never a state that
        followed a non-finite loss. ``ema``: ``checkpoint-best-ema.pth``, whose ``model`` holds the
        EMA weights (so evaluating it needs nothing EMA-specific; no optimizer: not resumable)."""
        self._check_finite()
        rng_ranks = None if ema else gather_rng_states(self.dist)    # every rank takes part
        if not self.dist.is_main:
            return
        if ema:
            path = os.path.join(self.ckpt_dir, "checkpoint-best-ema.pth")
            st = self.state_dict()
            st = {"model": st["model_ema"], "step": st["step"], "best_ema": self.best_ema,
                  "last_eval_ema": st["last_eval_ema"],
                  "meta": {**st["meta"], "weights": "ema", "ema_decay": self.ema.decay}}
            self.writer.submit(st, lambda st: atomic_save(st, path))
        elif best:
            path = os.path.join(self.ckpt_dir, "checkpoint-best.pth")
            self.writer.submit(self.state_dict(rng_ranks), lambda st: atomic_save(st, path))
        else:
            step, keep = self.step, self.cfg.keep_last
            self.writer.submit(self.state_dict(rng_ranks), lambda st: save_checkpoint(st, self.ckpt_dir, step, keep))
            path = os.path.join(self.ckpt_dir, f"checkpoint-{step:08d}.pth")
        self.log(f"saving {path}")

    # ---- metrics -------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        """Open the metric logs at the current step: records a previous attempt wrote after it
        (steps logged after its last checkpoint, which this run trains again) are dropped from
        ``metrics.jsonl`` and purged from TensorBoard, so every step appears once."""
        if not self.dist.is_main:
            return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        truncate_metrics(path, self.step)
        self._metrics_file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.step + 1)
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard logs (JSON lines are written)")

    def _write_metrics(self, rec: Dict[str, Any], section: str = "train") -> None:
        """One JSON line; its numbers also go to TensorBoard under ``section/`` (train, eval)."""
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(rec) + "\n")
            self._metrics_file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    name = k[len("eval_"):] if section == "eval" and k.startswith("eval_") else k
                    self._tb.add_scalar(f"{section}/{name}", v, rec["step"])

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tb is not None:
            self._tb.close()

    # ---- loss bookkeeping on the device (read only when logging or saving) ---------------------
    def _reset_loss(self) -> None:
        dev = self.dist.device
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self._loss_steps = 0
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=dev)   # first non-finite step
        self._bad_value = torch.zeros((), dtype=torch.float32, device=dev)      # and its loss
        self._stats = torch.zeros(3, dtype=torch.float64, device=dev)           # reduced in place, kept alive
        self._checked_step = self.step

    def _record_loss(self, loss: torch.Tensor) -> None:
        first = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._bad_value = torch.where(first, loss, self._bad_value)
        self._first_bad = torch.where(first, self.step, self._first_bad)
        self._loss_sum += loss.double()
        self._loss_steps += 1

    def _read_loss(self, reset: bool = True) -> float:
        """Mean loss since the last reset, averaged over ranks (one host sync); raises on a
        non-finite loss on any rank. Every rank calls it at the same steps (log steps, saves)."""
        self._stats[0] = self._loss_sum
        self._stats[1] = float(self._loss_steps)
        self._stats[2] = (self._first_bad >= 0).double()
        local_bad = int(self._first_bad.item())
        stats = all_reduce_sum_(self._stats, self.dist).tolist()
        if stats[2] > 0:
            if local_bad >= 0:
                at = self.plan.at(local_bad)
                where = (f"({self._bad_value.item()}) at step {local_bad} (stage {at.stage_index}, input {at.size}, "
                         f"lr {self.plan.lr(local_bad, self.cfg.base_lr(), self.cfg.warmup_epochs, self.cfg.min_lr):.3g})")
            else:
                where = f"on another rank between steps {self._checked_step} and {self.step}"
            raise NonFiniteLossError(
                f"non-finite loss {where}; stopping without saving. The last good "
                f"checkpoint is kept in {self.ckpt_dir}. Try a lower lr/blr, amp=bf16 or off, or clip_grad.")
        self._checked_step = self.step
        mean = stats[0] / max(stats[1], 1.0)
        if reset:
            self._loss_sum.zero_()
            self._loss_steps = 0
        return mean

    def _check_finite(self) -> None:
        """Before a checkpoint: stop if any step since the last check had a non-finite loss."""
        if self._checked_step != self.step:
            self._read_loss(reset=False)

    # ---- the loop ------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def _sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def _start_stage(self, ps: PlannedStage) -> None:
        self._prepare_stage(ps)
        if hasattr(self.task, "on_stage_start"):
            self.task.on_stage_start(self.model, ps)
            if self.ema is not None:
                self.task.on_stage_start(self.ema.module, ps)
        if self.replay is not None:
            self.replay.clear()                  # its host memory goes back now, not at garbage collection
        self.replay = None
        if ps.stage.replay_times > 1:
            self.replay = ReplayBuffer(ps.stage.replay_buffer, ps.stage.replay_times, self.replay_chunks(ps),
                                       store_dtypes=getattr(self.task, "replay_dtypes", None),
                                       seed=self.cfg.seed * 7919 + ps.index * 31 + self.dist.rank)
            if self._resume_replay is not None:
                self.replay.load_state_dict(self._resume_replay)
                self._refill_replay(ps, self.step - ps.start_step)
        self._resume_replay = None
        self.timing.stages.setdefault(ps.index, StageTiming(ps.stage.size))
        buffer = (f" (buffer: {ps.stage.replay_buffer} loader batches in {self.replay.chunks_per_batch} chunks each, "
                  f"{self.replay_bytes[ps.index] / 2 ** 30:.2f} GiB per process when full)" if self.replay is not None else "")
        self.log(f"stage {ps.index}: input {ps.stage.size}, batch {ps.batch_size} x accum {ps.accum_steps}, "
                 f"replay {ps.stage.replay_times}{buffer}, steps {ps.start_step}-{ps.end_step}")

    def _refill_replay(self, ps: PlannedStage, stage_step: int) -> None:
        """Resuming inside a replay stage: prepare again the loader batches the buffer held when the
        checkpoint was written (their samples and crops are seeded by stream position), so the
        resumed run replays what the uninterrupted one would have. The global RNG is left as the
        checkpoint restored it (tasks whose ``prepare`` draws random numbers, like random erasing,
        get fresh draws for these samples)."""
        micro_done = stage_step * ps.accum_steps
        n = min(self.replay.capacity, micro_done)
        if n == 0:
            return
        first = micro_done - n
        keys = list(itertools.islice(RunBatches(self.plan, 0, self.n, self.cfg.seed, self.dist)
                                     .stage_batches(ps, first // ps.accum_steps), first % ps.accum_steps, None))[:n]
        info = self.plan.at(ps.start_step)
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for batch in self.task.make_loader(keys):
                self.replay._store(self.task.prepare(batch[:-1], info).inputs)
        self.log(f"replay buffer refilled with the {n} loader batch(es) it held before the checkpoint")

    def _train_step(self, it: Iterator, info: StepInfo) -> int:
        """One optimizer step; returns the samples the model processed (this rank). No host sync."""
        cfg = self.cfg
        images = 0
        step_loss = None
        for a in range(info.accum_steps):
            batch = next(it)
            self.bad_samples += int(batch[-1].sum())             # CPU tensor: no device sync
            prepared = self.task.prepare(batch[:-1], info)
            self.bad_samples += prepared.skipped
            inputs = prepared.inputs
            if self.replay is not None:
                inputs = self.replay.step(*inputs)
            images += inputs[0].shape[0]
            sync = a == info.accum_steps - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            np.random.seed((cfg.seed * 1_000_003 + self.step * 101 + a * 7 + self.dist.rank) % 2 ** 32)
            if self._cuda_graphs:       # a new iteration: the graphs may reuse the previous one's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with ctx:
                with torch.autocast(self.dist.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    loss = self.task.loss(self.forward_model, inputs, info)
                self.scaler.scale(loss / info.accum_steps).backward()
            part = loss.detach().float() / info.accum_steps
            step_loss = part if step_loss is None else step_loss + part
        self._record_loss(step_loss)
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            # every optimizer step, also one an fp16 scaler skipped (inf gradients): as the official
            # loop does (it updates after loss_scaler(...) whatever the scaler decided)
            self.ema.update(self.model)
        if self._after_step is not None:
            self._after_step(self.model)
        return images

    def fit(self) -> Dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        os.makedirs(self.run_dir, exist_ok=True)
        self._resume_replay = None
        self.maybe_resume()
        first_step = self.step
        self._open_logs()
        self._reset_loss()
        self._last_loss = float("nan")
        total = plan.total_steps
        stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
        progress = None
        plain = False            # not on a terminal: plain progress lines instead of a bar
        if self.dist.is_main and cfg.progress and self.step < stop:
            if on_terminal():
                from tqdm import tqdm

                progress = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.1,
                                mininterval=1.0, bar_format=BAR_FORMAT)
            else:
                plain = True
        t_plain = float("-inf")
        control = StepControl(self.signals, self.dist, 60 * cfg.save_every_minutes)
        if self.step < stop:
            self.log(self.checkpoint_policy())
        try:
            control.begin()
            it = iter(self.task.make_loader(RunBatches(plan, self.step, self.n, cfg.seed, self.dist))) \
                if self.step < stop else None
            stage_idx = -1
            t_log, imgs_since = time.perf_counter(), 0
            self._t0, self._budget0 = t_log, plan.budget_fraction(self.step)
            t_stage = t_log
            while self.step < stop:
                info = plan.at(self.step)
                ps = plan.stages[info.stage_index]
                if info.stage_index != stage_idx:
                    stage_idx = info.stage_index
                    t_start = time.perf_counter()
                    self._start_stage(ps)       # growth runs: growing and Eq. 8's search, timed apart
                    self._sync()
                    t_stage = time.perf_counter()
                    self.timing.stage_start_seconds += t_stage - t_start
                    t_log += t_stage - t_start
                if self._before_step is not None:
                    info = self._before_step(self.model, info)
                lr = plan.lr(self.step, cfg.base_lr(), cfg.warmup_epochs, cfg.min_lr)
                self._set_lr(lr)
                images = self._train_step(it, info)
                imgs_since += images * self.dist.world_size
                st = self.timing.stages[stage_idx]
                st.images += images * self.dist.world_size
                st.steps += 1
                self.step += 1

                stage_end = self.step == ps.end_step
                signum, timed = control.poll()          # the same answer on every rank
                stopping = signum is not None and self.step < stop
                if stopping:
                    self.log(f"\n{signal_name(signum)}: saving step {self.step}, then stopping "
                             "(a second signal stops at once)")
                evaluate = getattr(self.task, "evaluate", None) is not None and (
                    stage_end or self.step == stop or (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0))
                save = stage_end or self.step == stop or stopping or timed or bool(
                    cfg.save_every_steps and self.step % cfg.save_every_steps == 0)
                if self.step % cfg.log_every == 0 or self.step == stop:
                    self._last_loss = self._read_loss()
                    now = time.perf_counter()
                    if self.dist.is_main:
                        rec = {"step": self.step, "stage": stage_idx, "size": info.size, "loss": self._last_loss,
                               "lr": lr, "budget": plan.budget_fraction(self.step), "magnitude": info.magnitude,
                               "images_per_s": imgs_since / max(now - t_log, 1e-9),
                               "data_epoch": self.position_at(self.step) / self.n, "bad_samples": self.bad_samples,
                               **(self.task.metrics() if hasattr(self.task, "metrics") else {})}
                        if self.dist.device.type == "cuda":
                            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2 ** 30
                        self._write_metrics(rec)
                        if progress is not None:
                            shown = {k: f"{v:.1f}" for k, v in self.eval_record().items() if k.endswith("top1")}
                            progress.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{lr:.2e}", size=info.size,
                                                 img_s=f"{rec['images_per_s']:.0f}", eta=self._eta(now), **shown,
                                                 refresh=False)
                        elif plain and (self.step == stop or now - t_plain >= PLAIN_PROGRESS_SECONDS):
                            self.log(self._progress_line(stage_idx, info.size, lr, rec["images_per_s"], now))
                            sys.stdout.flush()          # a redirected log gets it now, not at the next 8 KiB
                            t_plain = now
                    t_log, imgs_since = now, 0
                if progress is not None:
                    progress.update(1)
                if not (stage_end or evaluate or save):
                    continue

                # checkpoints, pictures, evaluation: timed apart from the steps (and the step time
                # so far is added to the stage first, so a checkpoint's timing is up to date)
                self._sync()                     # queued device work belongs to the steps
                t_over = time.perf_counter()
                st.seconds += t_over - t_stage
                if stage_end and self.dist.is_main:
                    self.task.on_stage_end(self.model, ps, self.run_dir)
                improved = self._evaluate() if evaluate else False
                if save:
                    self.save()
                    control.saved()
                if improved:
                    self.save(best=True)
                if evaluate and self._ema_improved:
                    self.save(ema=True)
                now = time.perf_counter()
                self.timing.overhead_seconds += now - t_over
                t_stage = now
                t_log += now - t_over
                if stopping:
                    self.writer.wait()          # on disk before the process says so
                    raise Stopped(f"stopped at step {self.step} of {total}; run the same command to resume",
                                  exit_code(signum))
            self.writer.wait()
        except BaseException:
            self._finish_writes()
            raise
        finally:
            control.close()
            if progress is not None:
                progress.close()
            self._close_logs()
            self._release_ddp()
        growth = getattr(self.task, "growth", None)
        summary = {**self.speed_summary(), "eval": self.eval_record(), "best": self.best,
                   **({"best_ema": self.best_ema} if self.ema is not None else {}),
                   **({"growth": growth.summary()} if growth is not None else {})}
        summary_path = os.path.join(self.run_dir, "summary.json")
        # a finished run started again trains nothing: its summary stays as written
        if self.dist.is_main and self.step > 0 and (self.step > first_step or not os.path.isfile(summary_path)):
            self.log(format_saving(summary))
            if summary["eval"]:
                self.log("last evaluation: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["eval"].items()))
            atomic_write_json(summary, summary_path)
        return {"step": self.step, "total_steps": total, "trained_steps": self.step - first_step,
                "loss": self._last_loss, "bad_samples": self.bad_samples,
                "best": self.best, "eval": self.last_eval, "speed": summary,
                **({"best_ema": self.best_ema, "eval_ema": self.last_eval_ema} if self.ema is not None else {})}

    def checkpoint_policy(self) -> str:
        """The line that says when this run writes checkpoints (logged at its start)."""
        cfg = self.cfg
        when = ["at every stage end and the last step"]
        if cfg.save_every_steps:
            when.append(f"every {cfg.save_every_steps} steps")
        if cfg.save_every_minutes:
            when.append(f"every {cfg.save_every_minutes:g} min of training (train.save_every_minutes)")
        return (f"checkpoints: {', '.join(when)}; Ctrl-C / SIGTERM saves the step it interrupts "
                f"(a second one stops at once), in {self.ckpt_dir}")

    def _release_ddp(self) -> None:
        """Drop the DDP wrapper (and its reducer's hold on the process group) while the process
        group is still registered, so that tearing the group down later is the last release
        (see engine.distributed.cleanup). The module itself stays for exports and evaluation."""
        self.ddp = self.forward_model = self.model

    def _finish_writes(self) -> None:
        """On the way out of a failed run: let a pending (good) checkpoint reach the disk; a write
        error is reported, the run's own error is the one raised."""
        try:
            self.writer.wait()
        except Exception as e:
            warnings.warn(f"the last checkpoint write failed as well: {type(e).__name__}: {e}")

    def speed_summary(self) -> Dict[str, Any]:
        cur = self.plan.curriculum
        planned = getattr(self.task, "planned_speedup", None)
        speedup = (planned() * self.baseline_epochs / self.plan.epochs if planned is not None
                   else cur.speedup(self.plan.epochs, self.baseline_epochs))
        return measured_saving(self.timing, cur.final_size, self.n, self.baseline_epochs, speedup, self.flops_ratio,
                               count_stage_starts=getattr(self.task, "growth", None) is not None)

    def eval_record(self) -> Dict[str, float]:
        """The last evaluation under its logged names (``eval_top1``, ``knn_top1``, ...)."""
        prefix = getattr(self.task, "eval_prefix", "eval_")
        return {**{f"{prefix}{k}": v for k, v in self.last_eval.items()},
                **{f"{prefix}ema_{k}": v for k, v in self.last_eval_ema.items()}}    # TensorBoard: eval/ema_top1

    def _evaluate(self) -> bool:
        """Run the task's evaluation (every rank), log and plot it, and say whether it is the best
        so far. The RNG is restored afterwards: evaluating never changes the training trajectory."""
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics = self.task.evaluate(self.model)
        self.last_eval = metrics
        key = getattr(self.task, "best_metric", None)
        improved = key is not None and (self.best is None or metrics[key] > self.best)
        if improved:
            self.best = metrics[key]
        self._ema_improved = False
        if self.ema is not None and self.cfg.ema_eval:          # the EMA weights, evaluated the same way
            with torch.random.fork_rng(devices=devices):
                self.last_eval_ema = self.task.evaluate(self.ema.module)
            self._ema_improved = key is not None and (self.best_ema is None or self.last_eval_ema[key] > self.best_ema)
            if self._ema_improved:
                self.best_ema = self.last_eval_ema[key]
        if self.dist.is_main and metrics:
            rec = self.eval_record()
            self._write_metrics({"step": self.step, **rec, "budget": self.plan.budget_fraction(self.step),
                                 "wall_s": self.timing.total_seconds}, section="eval")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in rec.items())
            self.log(f"eval at step {self.step}: {shown}" + (" (best)" if improved else "")
                     + (" (best EMA)" if self._ema_improved else ""))
            first = next(iter(rec))
            plot_eval_curve(os.path.join(self.run_dir, "metrics.jsonl"), first,
                            os.path.join(self.run_dir, f"{first}.png"))
        return improved

    def _eta(self, now: float) -> str:
        """Remaining time from the budget consumed per second (steps at small sizes are cheap, so
        a step-rate ETA would be optimistic early in a curriculum)."""
        done = self.plan.budget_fraction(self.step) - self._budget0
        if done <= 0:
            return "?"
        return clock((now - self._t0) * (1.0 - self.plan.budget_fraction(self.step)) / done)

    def _progress_line(self, stage: int, size: int, lr: float, images_per_s: float, now: float) -> str:
        """The plain progress line of a run not on a terminal (one ETA: :meth:`_eta`)."""
        total = self.plan.total_steps
        shown = "".join(f", {k} {v:.1f}" for k, v in self.eval_record().items() if k.endswith("top1"))
        return (f"progress: step {self.step}/{total} ({self.step / max(total, 1):.0%}), stage {stage} at {size}px, "
                f"loss {self._last_loss:.4f}, lr {lr:.2e}, {images_per_s:.0f} img/s{shown}, "
                f"elapsed {clock(now - self._t0)}, eta {self._eta(now)}")

    def replay_chunks(self, ps: PlannedStage) -> int:
        return check_stage_fits(ps, self.dist.world_size, getattr(self.task, "replay_chunks", 32))


def check_stage_fits(ps: PlannedStage, world_size: int, replay_chunks: int) -> int:
    """Raise :class:`ConfigError` when stage ``ps`` cannot be split over ``world_size`` processes
    and its accumulation micro-steps (and, in a replay stage, into ``data.replay_chunks``
    chunks); returns the replay chunks. Batch sizes do not depend on the dataset, so a plan for
    any dataset size checks a run before its data is scanned."""
    share = world_size * ps.accum_steps
    what = f"batch {ps.batch_size}" + (f" / replay {ps.stage.replay_times}" if ps.stage.replay_times > 1 else "")
    if ps.loader_batch_size % share:
        raise ConfigError(
            f"curriculum stage {ps.index} (size {ps.stage.size}): its loader batch {ps.loader_batch_size} ({what}) is "
            f"not divisible by {world_size} process(es) x train.accum_steps={ps.accum_steps}; choose "
            f"train.batch_size (or train.per_gpu_batch_size) so that every stage's batch divides evenly")
    micro = ps.loader_batch_size // share
    if ps.stage.replay_times > 1 and micro % replay_chunks:
        raise ConfigError(
            f"curriculum stage {ps.index} (size {ps.stage.size}, replay {ps.stage.replay_times}): the per-process "
            f"loader micro-batch {micro} ({what} / {world_size} process(es) / accum {ps.accum_steps}) is not "
            f"divisible by data.replay_chunks={replay_chunks}; allowed: a data.replay_chunks that divides {micro}, "
            f"or batch sizes that make it divisible")
    return replay_chunks


def check_plan_fits(plan: Plan, world_size: int, replay_chunks: int) -> None:
    """:func:`check_stage_fits` for every stage of ``plan``."""
    for ps in plan.stages:
        check_stage_fits(ps, world_size, replay_chunks)


def truncate_metrics(path: str, step: int) -> int:
    """Keep the JSON lines of ``path`` up to optimizer step ``step`` (atomically); returns how many
    were dropped. A torn last line (a killed writer) is dropped too."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def local_rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's generators (torch CPU, its CUDA device, Python, numpy) in checkpoint form:
    tensors and plain values only, so ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_local_rng_state(rng: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_to_tuple(rng["python"]))
    cuda = rng.get("cuda")
    if isinstance(cuda, list):                  # older checkpoints: every visible device's state
        cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)
    npy = rng.get("numpy")
    if npy is not None:
        np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["gauss"]))


def gather_rng_states(dist: DistInfo) -> List[Dict[str, Any]]:
    """Every rank's :func:`local_rng_state`, in rank order, on rank 0 (others get an empty list)."""
    mine = local_rng_state(dist.device)
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: List[Any] = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(mine, out, dst=0)
    return out if dist.is_main else []


def _to_tuple(x: Any) -> Any:
    """Python's random state comes back from torch.load as lists; setstate wants tuples."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
