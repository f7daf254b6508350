"""The one training loop: asks the curriculum plan what every optimizer step looks like.

A job (MAE pretraining, fine-tuning) plugs in a model and a :class:`Task` (its data pipeline and
loss); the loop owns everything else: sample order and sharding, replay, LR, mixed precision,
accumulation, clipping, checkpoints and resume, metrics. A stage change is just the plan's answer
changing: a new loader for the new size, the replay buffer emptied, the optimizer untouched.

Data order: a single stream of sample positions 0, 1, 2, ...; position k is sample
``perm_e[k mod n]`` of data epoch ``e = k // n`` (a seeded permutation per epoch). Optimizer step
t of a stage consumes the next ``loader_batch_size`` positions, split across ranks and
accumulation micro-steps. Augmentation is seeded by the position, so a resumed run sees exactly
the samples (and crops) the uninterrupted run would have seen, whatever the worker count.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.nn as nn

from efficienttrain.curriculum import Plan, PlannedStage, StepInfo
from efficienttrain.replay import ReplayBuffer

from .checkpoint import atomic_save, find_latest, load_checkpoint, save_checkpoint
from .config import ConfigError
from .distributed import DistInfo, all_reduce_mean
from .optim import no_weight_decay


@dataclass
class TrainConfig:
    """Optimisation and run settings shared by every job."""

    batch_size: int = 4096                 # global samples per optimizer step (all ranks, all micro-steps)
    accum_steps: int = 1                   # gradient-accumulation micro-steps per optimizer step
    blr: float = 1.5e-4                    # base LR; lr = blr * batch_size / 256 unless lr is set
    lr: Optional[float] = None
    min_lr: float = 0.0
    warmup_epochs: float = 40.0            # in budget epochs
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: Optional[float] = None
    amp: str = "auto"                      # auto (bf16 on capable GPUs, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    output_dir: str = ""                   # run directory (default: runs/<config name>)
    resume: str = "auto"                   # auto (continue from output_dir if possible) | never | path to a checkpoint
    save_every_steps: int = 0              # 0: only at stage ends and the end
    eval_every_steps: int = 0              # tasks that evaluate: also every N steps (always at stage ends and the end)
    keep_last: int = 3
    log_every: int = 10
    max_steps: Optional[int] = None        # stop early after this many optimizer steps (debugging, tests)
    progress: bool = True

    def validate(self, where: str) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"{where}.amp: {self.amp!r} is not allowed; allowed: auto, bf16, fp16, off")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError(f"{where}: batch_size and accum_steps must be >= 1")
        if len(self.betas) != 2:
            raise ConfigError(f"{where}.betas must be two numbers, got {self.betas}")

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


class Task(Protocol):
    """What a job plugs into the loop."""

    def make_loader(self, stage: PlannedStage, batches: "StageBatches") -> Iterator[Tuple[torch.Tensor, ...]]:
        """Yield one batch per list of (dataset index, stream position, magnitude): a tuple of CPU
        tensors whose last entry counts, per sample, the unreadable files skipped to produce it."""

    def loss(self, model: nn.Module, batch: Tuple[torch.Tensor, ...], info: StepInfo) -> torch.Tensor:
        """Move the batch to the device, apply the stage transform (e.g. low-frequency crop), return the loss."""

    def on_stage_end(self, model: nn.Module, stage: PlannedStage, run_dir: str) -> None:
        """Pictures or evaluations at the end of a stage (rank 0 only)."""

    def checkpoint_meta(self) -> Dict[str, Any]:
        """Metadata saved in every checkpoint (architecture, sizes, target, ...)."""

    # Optional: ``on_stage_start(model, stage)`` (per-size model preparation), and
    # ``evaluate(model) -> dict`` with ``best_metric`` (a key of that dict, higher is better):
    # then evaluation runs at stage ends (and every ``eval_every_steps``) and the best checkpoint
    # is kept as ``checkpoint-best.pth``.


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


class StageBatches:
    """This rank's micro-batches of (dataset index, stream position, augmentation magnitude), from
    ``first_step`` to the end of a stage; lazy (a stage can span hundreds of millions of samples).
    Used as a DataLoader ``batch_sampler``: the magnitude travels with every sample, so the
    curriculum's per-step augmentation strength reaches transforms running in worker processes."""

    def __init__(self, ps: PlannedStage, first_step: int, stage_position: int, n: int, seed: int,
                 dist: DistInfo) -> None:
        self.ps, self.first_step, self.stage_position, self.n, self.seed = ps, first_step, stage_position, n, seed
        self.per_rank = ps.loader_batch_size // dist.world_size
        self.micro = self.per_rank // ps.accum_steps
        self.rank = dist.rank

    def __len__(self) -> int:
        return (self.ps.steps - self.first_step) * self.ps.accum_steps

    def __iter__(self) -> Iterator[List[Tuple[int, int, float]]]:
        for t in range(self.first_step, self.ps.steps):
            base = self.stage_position + t * self.ps.loader_batch_size + self.rank * self.per_rank
            magnitude = self.ps.stage.magnitude_at(t / self.ps.steps)   # the step's augmentation strength
            for a in range(self.ps.accum_steps):
                start = base + a * self.micro
                yield [(sample_index(p, self.n, self.seed), p, magnitude) for p in range(start, start + self.micro)]


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
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class NonFiniteLossError(FloatingPointError):
    pass


class CurriculumTrainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, plan: Plan, dist: DistInfo,
                 run_dir: str, config_dict: Dict[str, Any], dataset_size: int,
                 log: Callable[[str], None] = print,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        self.cfg, self.task, self.plan, self.dist = cfg, task, plan, dist
        self.run_dir, self.config_dict, self.n = run_dir, config_dict, dataset_size
        self.log = log if dist.is_main else (lambda msg: None)
        self.model = model.to(dist.device)
        for ps in plan.stages:
            if ps.loader_batch_size % (dist.world_size * ps.accum_steps):
                raise ConfigError(
                    f"stage {ps.index}: loader batch {ps.loader_batch_size} (batch {ps.batch_size} / replay "
                    f"{ps.stage.replay_times}) is not divisible by world size {dist.world_size} x accum_steps "
                    f"{ps.accum_steps}; choose a batch size that is")
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
                    if dist.enabled else self.model)
        self.forward_model = torch.compile(self.ddp) if cfg.compile else self.ddp
        fused = dist.device.type == "cuda"
        self.optimizer = optimizer or torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.base_lr(),
                                                        betas=tuple(cfg.betas), **({"fused": True} if fused else {}))
        self.dtype = amp_dtype(cfg, dist.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.step = 0
        self.bad_samples = 0
        self.best: Optional[float] = None
        self.last_eval: Dict[str, float] = {}
        self.replay: Optional[ReplayBuffer] = None
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self._metrics_file = None
        self._tb = None

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "samples_seen": self.position_at(self.step),
            "bad_samples": self.bad_samples,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "replay": self.replay.state_dict() if self.replay is not None else None,
            "meta": {**self.task.checkpoint_meta(), "position": {
                "step": self.step, "total_steps": self.plan.total_steps,
                "stage": self.plan.at(min(self.step, self.plan.total_steps - 1)).stage_index,
                "budget_fraction": self.plan.budget_fraction(self.step)},
                "curriculum": self.plan.curriculum.to_dict(), "budget_epochs": self.plan.epochs,
                "config": self.config_dict},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.bad_samples = int(state.get("bad_samples", 0))
        self.best = state.get("best")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_to_tuple(rng["python"]))
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._resume_replay = state.get("replay")

    def position_at(self, step: int) -> int:
        """Stream position (samples consumed) before optimizer ``step``."""
        pos = 0
        for ps in self.plan.stages:
            if step <= ps.start_step:
                break
            pos += min(step - ps.start_step, ps.steps) * ps.loader_batch_size
        return pos

    def maybe_resume(self) -> bool:
        cfg = self.cfg
        if cfg.resume == "never":
            return False
        path = find_latest(self.ckpt_dir) if cfg.resume == "auto" else cfg.resume
        if path is None:
            return False
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume checkpoint {path!r} does not exist")
        state = load_checkpoint(path)
        saved = state["meta"]["position"]["total_steps"]
        if saved != self.plan.total_steps:
            raise ConfigError(
                f"cannot resume from {path}: it belongs to a plan of {saved} steps, this config gives "
                f"{self.plan.total_steps} (curriculum, budget, dataset or batch size changed); use a new "
                f"output_dir or resume=never")
        self.load_state_dict(state)
        self.log(f"resumed from {path} at step {self.step}/{self.plan.total_steps}")
        return True

    def save(self) -> None:
        if self.dist.is_main:
            path = save_checkpoint(self.state_dict(), self.ckpt_dir, self.step, self.cfg.keep_last)
            self.log(f"saved {path}")

    # ---- metrics -------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        self._metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"))
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard logs (JSON lines are written)")

    def _write_metrics(self, rec: Dict[str, Any]) -> None:
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(rec) + "\n")
            self._metrics_file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, rec["step"])

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tb is not None:
            self._tb.close()

    # ---- the loop ------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def _micro_batches(self, ps: PlannedStage, first_step: int) -> Iterator[Tuple[torch.Tensor, ...]]:
        batches = StageBatches(ps, first_step, self.position_at(ps.start_step), self.n, self.cfg.seed, self.dist)
        return iter(self.task.make_loader(ps, batches))

    def fit(self) -> Dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        os.makedirs(self.run_dir, exist_ok=True)
        self._resume_replay = None
        self.maybe_resume()
        self._open_logs()
        total = plan.total_steps
        stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
        progress = None
        if self.dist.is_main and cfg.progress and self.step < stop:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.1,
                            mininterval=1.0)
        last_loss = float("nan")
        try:
            stage_idx, it = -1, None
            t_log, imgs_since = time.perf_counter(), 0
            self._t0, self._budget0 = t_log, plan.budget_fraction(self.step)
            while self.step < stop:
                info = plan.at(self.step)
                ps = plan.stages[info.stage_index]
                if info.stage_index != stage_idx:
                    stage_idx = info.stage_index
                    if hasattr(self.task, "on_stage_start"):
                        self.task.on_stage_start(self.model, ps)
                    it = self._micro_batches(ps, info.stage_step)
                    self.replay = None
                    if info.replay_times > 1:
                        self.replay = ReplayBuffer(info.replay_buffer, info.replay_times, self.task_chunks(ps),
                                                   seed=cfg.seed * 7919 + stage_idx * 31 + self.dist.rank)
                        if self._resume_replay is not None:
                            self.replay.load_state_dict(self._resume_replay)
                    self._resume_replay = None
                    self.log(f"stage {stage_idx}: input {info.size}, batch {info.batch_size} x accum "
                             f"{info.accum_steps}, replay {info.replay_times}, steps {ps.start_step}-{ps.end_step}")
                lr = plan.lr(self.step, cfg.base_lr(), cfg.warmup_epochs, cfg.min_lr)
                self._set_lr(lr)
                loss_sum = 0.0
                for a in range(info.accum_steps):
                    batch = next(it)
                    batch, bad = batch[:-1], int(batch[-1].sum())
                    self.bad_samples += bad
                    if self.replay is not None:
                        batch = self.replay.step(*batch)
                    imgs_since += batch[0].shape[0] * self.dist.world_size
                    sync = a == info.accum_steps - 1 or not self.dist.enabled
                    ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                    np.random.seed((cfg.seed * 1_000_003 + self.step * 101 + a * 7 + self.dist.rank) % 2 ** 32)
                    with ctx:
                        with torch.autocast(self.dist.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                            loss = self.task.loss(self.forward_model, batch, info)
                        self.scaler.scale(loss / info.accum_steps).backward()
                    loss_sum += loss.detach().float().item()
                loss_val = all_reduce_mean(loss_sum / info.accum_steps, self.dist)
                if not math.isfinite(loss_val):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_val}) at step {self.step} (stage {stage_idx}, input {info.size}, "
                        f"lr {lr:.3g}); stopping without saving. The last good checkpoint is kept in "
                        f"{self.ckpt_dir}. Try a lower lr/blr, amp=bf16 or off, or clip_grad.")
                if cfg.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                last_loss = loss_val

                if self.dist.is_main and (self.step % cfg.log_every == 0 or self.step == stop):
                    now = time.perf_counter()
                    rec = {"step": self.step, "stage": stage_idx, "size": info.size, "loss": loss_val, "lr": lr,
                           "budget": plan.budget_fraction(self.step), "magnitude": info.magnitude,
                           "images_per_s": imgs_since / max(now - t_log, 1e-9),
                           "data_epoch": self.position_at(self.step) / self.n, "bad_samples": self.bad_samples}
                    if self.dist.device.type == "cuda":
                        rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2 ** 30
                    self._write_metrics(rec)
                    t_log, imgs_since = now, 0
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", size=info.size,
                                             img_s=f"{rec['images_per_s']:.0f}", eta=self._eta(now), refresh=False)
                if progress is not None:
                    progress.update(1)

                stage_end = self.step == ps.end_step
                if stage_end and self.dist.is_main:
                    self.task.on_stage_end(self.model, ps, self.run_dir)
                improved = False
                if hasattr(self.task, "evaluate") and (
                        stage_end or self.step == stop or (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0)):
                    improved = self._evaluate()
                if stage_end or (cfg.save_every_steps and self.step % cfg.save_every_steps == 0) or self.step == stop:
                    self.save()
                if improved and self.dist.is_main:
                    atomic_save(self.state_dict(), os.path.join(self.ckpt_dir, "checkpoint-best.pth"))
        finally:
            if progress is not None:
                progress.close()
            self._close_logs()
        return {"step": self.step, "total_steps": total, "loss": last_loss, "bad_samples": self.bad_samples,
                "best": self.best, "eval": self.last_eval}

    def _evaluate(self) -> bool:
        """Run the task's evaluation (every rank), log it, and say whether it is the best so far."""
        metrics = self.task.evaluate(self.model)
        self.last_eval = metrics
        key = getattr(self.task, "best_metric", None)
        improved = key is not None and (self.best is None or metrics[key] > self.best)
        if improved:
            self.best = metrics[key]
        if self.dist.is_main:
            self._write_metrics({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.log(f"eval at step {self.step}: {shown}" + (" (best)" if improved else ""))
        return improved

    def _eta(self, now: float) -> str:
        """Remaining time from the budget consumed per second (steps at small sizes are cheap, so
        a step-rate ETA would be optimistic early in a curriculum)."""
        done = self.plan.budget_fraction(self.step) - self._budget0
        if done <= 0:
            return "?"
        left = (now - self._t0) * (1.0 - self.plan.budget_fraction(self.step)) / done
        h, rem = divmod(int(left), 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}"

    def task_chunks(self, ps: PlannedStage) -> int:
        micro = ps.loader_batch_size // (self.dist.world_size * ps.accum_steps)
        chunks = getattr(self.task, "replay_chunks", 32)
        if micro % chunks:
            raise ConfigError(f"stage {ps.index}: the per-rank loader micro-batch {micro} is not divisible by "
                              f"replay_chunks={chunks}; choose batch sizes that are")
        return chunks


def _to_tuple(x: Any) -> Any:
    """Python's random state comes back from torch.load as lists; setstate wants tuples."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
