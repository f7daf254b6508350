"""AutoProg / Prog progressive growth inside the one training loop.

The curriculum library holds the schedules (:mod:`efficienttrain.growth`) and the operators on a
block list (:mod:`efficienttrain.growth_ops`); this module runs them in a training job. It knows
nothing about MAE or classification: a task gives it the model, the name of its block list, the
patch size and a ``subset_loss(model, size)`` callback (Eq. 8's fixed-augmentation training loss),
and forwards the trainer's hooks to it (``prepare_stage``, ``before_step``, ``after_step``,
``state_dict`` / ``load_state_dict``).

How a run grows:
- The plan is an ``epochs``-budget :class:`~efficienttrain.curriculum.Curriculum` whose stages are
  the growth stages; an AutoProg stage that searches is two plan stages, its supernet phase
  (``search_epochs``) and the training of the chosen sub-network (the rest of the stage). Sizes
  the plan cannot know yet (AutoProg's undecided stages) are the uniform schedule's placeholders;
  every step's real input size is what :meth:`GrowthController.before_step` returns.
- Growth happens at plan-stage starts (``prepare_stage``). The active blocks are then moved to
  slots 0..d-1 in execution order (:func:`~efficienttrain.growth_ops.permute_slots` moves weights
  and optimizer state between slots, modules stay), so every checkpoint has the standard layout:
  the final model loads into timm's ViT (or the official MAE code) as it is, and a resumed run's
  fresh model needs no replay of the growth history.
- MoGrow's momentum network (Eq. 3, m = ``growth.momentum``, the official 0.9996) is a float32 copy
  updated after every optimizer step; it is saved in every checkpoint (task state, with its update
  count) with the AutoProg decisions. Its decay warms up, min(m, (1 + t) / (10 + t)) at update t
  (``growth.momentum_warmup``, :class:`~engine.ema.WeightEma`): with a constant m an EMA of a short
  run is mostly the random initialisation (0.998^45 = 0.91), and MoGrow, which copies the whole
  network from it at every growth, would throw the training away (the demo: 82 % top-1 before a
  growth, 68 % for the constant-0.998 EMA). Every growth logs the subset loss just before and just
  after it (continuity; the demo's stay within 1.1x).
- AutoProg scores with a second EMA, as the official code (its list 0.998 ... 0.9996: scoring with
  the first, growing from the last): ``growth.score_momentum`` (0.998, warmed up the same way),
  grown with the supernet (new slots copy their sources within it, the official
  ``load_slice_clone``). Eq. 8's loss of a candidate is the mean over 5 snapshots in the supernet
  phase's last epoch (:func:`~efficienttrain.growth.snapshot_positions`) of its loss on the fixed
  subset, measured with that EMA in train mode (drop path on, RNG forked); its runtime T is the
  forward+backward time per image measured at the first snapshot (``growth.runtime=measured``,
  the paper's) or the block-FLOPs proxy :func:`~efficienttrain.growth.vit_cost`
  (``growth.runtime=flops``: deterministic, for tests). Losses and times are averaged over the
  ranks, so every rank chooses the same sub-network; a resumed run keeps the snapshots already
  taken (checkpointed) and chooses from the same numbers.
- Eq. 8's subset is the task's: a seeded class-stratified sample of ``growth.search_images``
  training images (:func:`search_subset`; the paper: 50K random ImageNet images), logged once.
- Inputs shrink to a sub-network's size by ``growth.shrink``: bilinear interpolation without
  antialiasing (the official code's ``F.interpolate``) by default, or the EfficientTrain
  low-frequency crop (``fourier``). ``data.lowfreq`` is for curricula and stays at its default.
- Remaining deviations from the official code: the subset is ``search_images`` images, not 50
  batches of the training loader with its augmentation; the supernet is built by Interpolation
  (MoGrow: from the momentum network), where the official code slices a deeper model and clones
  layers; the last-epoch window is measured in optimizer steps of this run's plan; stage 0 is
  searched from random initialisation (so is the official code's); width growth is not supported.
- Not implemented:- Not implemented: growth of the width (the paper grows patches and depth only), torch.compile
  and the trainer's weight EMA during growth, replay, and ``cpu-lanczos`` (sizes are decided on
  the device at run time).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from efficienttrain.curriculum import Curriculum, PlannedStage, Stage, StepInfo
from efficienttrain.fourier import downsample, low_frequency_crop
from efficienttrain.growth import (AutoProg, GrowthError, GrowthSpace, Prog, SubNet, adareg, select_subnet,
                                   snapshot_positions, stage_fraction, vit_cost)
from efficienttrain.growth_ops import (GROWTH_OPS, INTERPOLATING_OPS, ElasticSupernet, build_supernet, compaction,
                                       copy_block, grow, make_elastic, permute_slots, plan_growth,
                                       reset_optimizer_state, set_drop_path)

from .config import ConfigError
from .ema import WeightEma, unwrap
from .speed import nothing_planned, times

SCHEDULES = ("none", "prog", "autoprog")
RUNTIMES = ("measured", "flops")
SHRINKS = ("bilinear", "fourier")
SNAPSHOTS = 5                               # Eq. 8's losses: snapshots over the supernet's last epoch (official)


@dataclass
class GrowthConfig:
    """Progressive growth of a ViT's input size and depth (AutoProg, CVPR 2022)."""

    schedule: str = "none"                 # none | prog (manual uniform linear growth) | autoprog (supernet search
                                           # of every middle stage's sub-network, Eq. 8)
    omega: float = 0.5                     # the grow space s1*Omega: s1, the first stage's ratio of the final input
                                           # size and depth (the paper: 0.5, or 0.4 for a larger saving)
    stages: int = 4                        # growth stages (ratios equispaced from omega to 1; the paper: 4)
    operator: str = "mogrow"               # how new blocks start: mogrow (interpolation from the momentum network,
                                           # the paper's) | interpolation | stacking | randinit | identity (needs
                                           # LayerScale: model.kwargs.init_values)
    momentum: float = 0.9996               # MoGrow's momentum network (grown from): m of Eq. 3, updated every
                                           # optimizer step (the official code grows from its 0.9996 EMA)
    momentum_warmup: bool = True           # step t's decay is min(m, (1 + t) / (10 + t)) (warm-up) for both EMAs, so
                                           # in short runs they are not mostly the random initialisation
                                           # (0.998^45 = 0.91); false: the constant m of Eq. 3
    score_momentum: float = 0.998          # autoprog: the EMA network Eq. 8 scores candidates with (official: 0.998)
    runtime: str = "measured"              # autoprog: Eq. 8's T, measured forward+backward time per image (the
                                           # paper's) | flops (the block-FLOPs proxy: deterministic, for tests)
    shrink: str = "bilinear"               # how inputs shrink to a sub-network's size: bilinear (no antialiasing,
                                           # the official code's) | fourier (the EfficientTrain low-frequency crop)
    search_epochs: float = 2.0             # autoprog: supernet epochs at the start of each searched stage (budget
                                           # epochs, part of the training: weight recycling)
    search_first: bool = True              # autoprog: search the first stage too (the official code); false: train
                                           # the smallest sub-network in it
    search_images: int = 256               # the fixed-augmentation subset Eq. 8's losses (and the growth log's
                                           # continuity check) are measured on: a seeded class-stratified sample
                                           # of N training images (unlabelled data: a seeded uniform sample),
                                           # evaluation transform. The paper: 50000 (ImageNet, full scale)
    alpha: Optional[float] = None          # autoprog: Eq. 8's alpha (null: balanced over the candidates,
                                           # efficienttrain.growth.balance_alpha)
    adareg: bool = False                   # AdaReg: RandAug magnitude 0.5x..1x, drop path and erasing 0..1x over the
                                           # stages (stage k of K: k / (K - 1); supernet phases: the full values;
                                           # the official code) (the paper: on for VOLO, off for DeiT)
    multiple_of: Optional[int] = None      # input-size rounding (null: the patch size, the paper's rule)

    def validate(self, where: str) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r} is not allowed; allowed: {', '.join(SCHEDULES)}")
        if self.operator not in GROWTH_OPS:
            raise ConfigError(f"{where}.operator: {self.operator!r} is not allowed; allowed: {', '.join(GROWTH_OPS)}")
        if self.schedule == "autoprog" and self.operator not in INTERPOLATING_OPS:
            raise ConfigError(f"{where}.operator={self.operator}: the AutoProg supernet inserts blocks by "
                              f"interpolation; allowed with schedule=autoprog: {', '.join(INTERPOLATING_OPS)}")
        if not 0 < self.omega <= 1:
            raise ConfigError(f"{where}.omega must be in (0, 1] (the paper: 0.5 or 0.4), got {self.omega}")
        if not (isinstance(self.stages, int) and self.stages >= 2):
            raise ConfigError(f"{where}.stages must be an integer >= 2, got {self.stages!r}")
        if not 0 < self.momentum < 1:
            raise ConfigError(f"{where}.momentum must be in (0, 1) (the official code: 0.9996), got {self.momentum}")
        if not 0 < self.score_momentum < 1:
            raise ConfigError(f"{where}.score_momentum must be in (0, 1) (the official code: 0.998), "
                              f"got {self.score_momentum}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"{where}.runtime: {self.runtime!r} is not allowed; allowed: {', '.join(RUNTIMES)}")
        if self.shrink not in SHRINKS:
            raise ConfigError(f"{where}.shrink: {self.shrink!r} is not allowed; allowed: {', '.join(SHRINKS)}")
        if not self.search_epochs > 0:
            raise ConfigError(f"{where}.search_epochs must be > 0, got {self.search_epochs}")
        if not isinstance(self.momentum_warmup, bool):
            raise ConfigError(f"{where}.momentum_warmup must be true or false, got {self.momentum_warmup!r}")
        if self.search_images < 1:
            raise ConfigError(f"{where}.search_images must be >= 1, got {self.search_images}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"{where}.alpha must be a number >= 0 (or null: balanced), got {self.alpha}")
        if self.multiple_of is not None and self.multiple_of < 1:
            raise ConfigError(f"{where}.multiple_of must be >= 1 (or null: the patch size), got {self.multiple_of}")

    @property
    def enabled(self) -> bool:
        return self.schedule != "none"

    def check_run(self, where: str, *, curriculum: str, lowfreq: str, ema_decay: float, compile: bool,
                  epochs: float) -> None:
        """Settings growth cannot be combined with (each a clear error, never ignored)."""
        if not self.enabled:
            return
        if curriculum != "baseline":
            raise ConfigError(f"{where}.schedule={self.schedule} sets the input sizes itself; curriculum.name must be "
                              f"baseline, got {curriculum!r}")
        if lowfreq != "fft":
            raise ConfigError(f"{where}.schedule={self.schedule} shrinks inputs on the device by {where}.shrink "
                              f"({' | '.join(SHRINKS)}); data.lowfreq={lowfreq} is for curricula: leave it at fft")
        if ema_decay:
            raise ConfigError(f"{where}.schedule={self.schedule} with train.ema_decay={ema_decay:g} is not supported "
                              f"(MoGrow's momentum network is {where}.momentum); set train.ema_decay=0")
        if compile:
            raise ConfigError(f"{where}.schedule={self.schedule} changes the active blocks per step; train.compile "
                              "is not supported with growth: set train.compile=false")
        if self.schedule == "autoprog":
            stage = epochs / self.stages
            if not self.search_epochs < stage:
                raise ConfigError(f"{where}.search_epochs={self.search_epochs:g} must be shorter than a growth stage "
                                  f"(curriculum.epochs {epochs:g} / {self.stages} stages = {stage:g} epochs)")


SubsetLoss = Callable[..., float]     # (model, size, backward=False) -> mean loss per image


def shrink_input(x: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """A final-size batch at a sub-network's input ``size`` (``growth.shrink``)."""
    if x.shape[-1] == size:
        return x
    if how == "fourier":
        return low_frequency_crop(x, size)
    if how == "bilinear":
        return downsample(x, size, "bilinear", antialias=False)
    raise ConfigError(f"growth.shrink: {how!r} is not allowed; allowed: {', '.join(SHRINKS)}")


def _mean_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """The ranks' mean of each value (unchanged without torch.distributed), so every rank decides alike."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [float(v) for v in values]
    dev = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()


def search_subset(labels: Optional[Sequence[int]], n: int, seed: int, total: Optional[int] = None) -> List[int]:
    """The sorted indices of Eq. 8's fixed subset: ``n`` images, a seeded class-stratified sample
    (classes with enough images get counts differing by at most one; a smaller class gives all it
    has and the rest goes to the others), or with ``labels=None`` a seeded uniform sample of
    ``range(total)``. A pure function of its arguments, so a resumed run measures the same images;
    the paper samples 50K random ImageNet images, and the first N files of a class-sorted list
    would be one class."""
    rng = random.Random(1_000_003 * int(seed) + 4242)
    if labels is None:
        return sorted(rng.sample(range(int(total or 0)), min(n, int(total or 0))))
    by_class: Dict[int, List[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    order = sorted(by_class)
    rng.shuffle(order)                                # which classes get the remainder: seeded
    quota = {c: 0 for c in order}
    left = min(n, len(labels))
    while left > 0:                                   # water-filling: the lowest counts get the extra ones
        open_ = sorted((c for c in order if quota[c] < len(by_class[c])), key=lambda c: quota[c])
        share, extra = divmod(left, len(open_))
        for r, c in enumerate(open_):
            take = min(share + (r < extra), len(by_class[c]) - quota[c])
            quota[c] += take
            left -= take
    return sorted(i for c in sorted(by_class) for i in rng.sample(by_class[c], quota[c]))


def subset_line(indices: Sequence[int], labels: Optional[Sequence[int]]) -> str:
    """The run log's description of the subset: ``search subset: N images, C classes, a-b per class``."""
    if labels is None:
        return f"search subset: {len(indices)} images, a seeded uniform sample (no class labels)"
    counts = Counter(int(labels[i]) for i in indices)
    per = [counts.get(c, 0) for c in set(int(y) for y in labels)]
    return (f"search subset: {len(indices)} images, {len(counts)} classes, "
            f"{min(per, default=0)}-{max(per, default=0)} per class")


class GrowthController:
    """Runs a Prog or AutoProg schedule on ``model.<attr>`` (see the module docstring).

    ``subset_loss(model, size, backward=False)``: the mean training loss per image on the task's
    fixed subset at input ``size`` with the model's currently active blocks (no gradients; with
    ``backward=True`` it also back-propagates each batch, for the runtime measurement).
    ``drop_path``: the complete model's stochastic-depth rate, re-spread over the active blocks at
    every change.
    """

    def __init__(self, cfg: GrowthConfig, model: nn.Module, *, final_size: int, patch_size: int, epochs: float,
                 embed_dim: Optional[int] = None, drop_path: float = 0.0, seed: int = 0,
                 subset_loss: Optional[SubsetLoss] = None, log: Callable[[str], None] = print,
                 attr: str = "blocks") -> None:
        self.cfg, self.attr, self.seed, self.log = cfg, attr, seed, log
        self.drop_path = float(drop_path)
        self.subset_loss = subset_loss
        self.blocks = make_elastic(model, attr)
        num = len(self.blocks)
        if cfg.operator == "identity" and not any(isinstance(getattr(m, "gamma", None), nn.Parameter)
                                                   for m in self.blocks[0].modules()):
            raise ConfigError("growth.operator=identity needs blocks with LayerScale (set model.kwargs.init_values, "
                              "e.g. 1.0); or choose another growth.operator")
        if self.drop_path > 0 and num > 1 and not any(hasattr(m, "drop_prob") for m in self.blocks[1].modules()):
            raise ConfigError("growth re-spreads stochastic depth over the active blocks, but the model has no "
                              "DropPath modules; build it with a drop path rate > 0")
        try:
            self.space = GrowthSpace.build(final_size, num, cfg.omega, cfg.stages, cfg.multiple_of or patch_size)
            self.auto = (AutoProg(self.space, epochs, cfg.search_epochs, cfg.search_first)
                         if cfg.schedule == "autoprog" else None)
        except GrowthError as e:
            raise ConfigError(f"growth: {e}") from None
        self.prog = Prog(self.space)
        self.cost = vit_cost(patch_size, embed_dim)
        # plan stage -> (growth stage, phase)
        self.phases: List[Tuple[int, str]] = []
        for k in range(self.space.num_stages):
            if self.auto is not None and k in self.auto.searched_stages:
                self.phases.append((k, "supernet"))
            self.phases.append((k, "train"))
        self.momentum: Optional[WeightEma] = None      # MoGrow: the network grown from
        self.scorer: Optional[WeightEma] = None        # AutoProg: the network Eq. 8 scores
        self._pending_emas: Dict[str, Tuple[Dict[str, torch.Tensor], int]] = {}
        self.entered = -1                       # the last plan stage whose start was prepared
        self.current = self.space.smallest      # the sub-network trained now (supernet: the one it grew from)
        self.order: Tuple[int, ...] = tuple(range(self.current.depth))   # its blocks (compacted: 0..d-1)
        self.supernet: Optional[ElasticSupernet] = None
        self.selections: List[Dict[str, Any]] = []
        self.snapshots: List[Dict[str, Any]] = []    # this supernet phase's Eq. 8 measurements so far
        self.continuity: List[Dict[str, Any]] = []   # per growth: the subset loss before and after (this process)
        self.search_seconds = 0.0                    # scoring candidates (snapshots, timing, Eq. 8), this process
        self.subset_images: Optional[int] = None     # the task's Eq. 8 subset size (runtime per image)
        self.reg_fraction = 1.0
        self._stage = (0, "train")                   # the growth stage and phase being trained
        self._phase_start, self._phase_steps, self._positions = 0, 0, ()   # supernet phase: first step, steps,
                                                                            # snapshot positions

    # ---- the plan -----------------------------------------------------------------------------
    def _fraction(self, k: int, phase: str) -> float:
        """AdaReg's position: the stage index (module docstring of efficienttrain.growth)."""
        return 1.0 if phase == "supernet" else stage_fraction(k, self.space.num_stages)

    def curriculum(self, magnitude: float) -> Curriculum:
        """The run's plan stages: one per growth stage, two (supernet, train) for a searched one.
        RandAug magnitude constant, or by AdaReg over the stage index."""
        shares = []
        for k, phase in self.phases:
            stage = 1.0 / self.space.num_stages
            if self.auto is not None and k in self.auto.searched_stages:
                part = self.cfg.search_epochs / self.auto.epochs
                stage = part if phase == "supernet" else stage - part
            shares.append(stage)
        shares[-1] = 1.0 - sum(shares[:-1])
        stages = []
        for (k, phase), share in zip(self.phases, shares):
            level = self.space.level(k)
            m = adareg(self._fraction(k, phase), magnitude, 0, 0).magnitude if self.cfg.adareg else magnitude
            stages.append(Stage(size=level.size, share=share, magnitude=float(m)))
        desc = ("AutoProg: supernet search of every stage's sub-network but the last" if self.auto is not None
                else "Prog: uniform linear growth of input size and depth")
        return Curriculum(self.cfg.schedule, tuple(stages), "epochs", desc)

    def describe(self) -> str:
        """The growth space and the schedule (chosen so far), one line."""
        sched = []
        for k in range(self.space.num_stages):
            try:
                sub = self.auto.subnet(k) if self.auto is not None else self.space.level(k)
                sched.append(str(sub))
            except GrowthError:
                sched.append(f"(searched; uniform: {self.space.level(k)})")
        return (f"growth {self.cfg.schedule} (operator {self.cfg.operator}, space {self.cfg.omega:g} Omega: sizes "
                f"{list(self.space.sizes)}, depths {list(self.space.depths)}): " + " -> ".join(sched))

    def planned_compute(self) -> float:
        """Planned training compute relative to the complete model for the same epochs (block FLOPs);
        AutoProg's undecided stages count as the uniform schedule's sub-network (at least the last choice)."""
        if self.auto is None:
            return self.prog.compute(self.cost)
        auto = self.auto
        while auto.pending is not None:
            k = auto.pending
            level = self.space.level(k)
            auto = auto.decide(min(auto.candidates(k), key=lambda c: (abs(c.depth - level.depth),
                                                                      abs(c.size - level.size), c.depth, c.size)))
        return auto.compute(self.cost)

    def planned_speedup(self) -> float:
        return 1.0 / self.planned_compute()

    def plan_line(self, model: str = "model") -> str:
        """The planned block-FLOPs saving, for the run log before training."""
        note = ("; AutoProg stages count as the candidate closest to the uniform schedule until chosen"
                if self.auto is not None else "")
        return (f"growth plan: {self.planned_compute():.1%} of the complete {model}'s block FLOPs for the same "
                f"epochs ({times(self.planned_speedup(), 'block compute')}{note})")

    def result_lines(self, speed: Dict[str, Any], model: str = "model") -> str:
        """The chosen schedule, its planned saving and the measured one (``speed``: the trainer's
        speed summary), for the run log after training."""
        measured = speed.get("measured_speedup")
        search = (f", {speed['stage_start_seconds']:.1f} s of it growing and choosing at stage starts"
                  if speed.get("stage_starts_measured") else "")
        if self.auto is not None:
            search += f", {self.search_seconds:.1f} s scoring candidates"
        planned = speed.get("planned_speedup", self.planned_speedup())
        if nothing_planned(planned):
            return self.describe()
        return (f"{self.describe()}\ngrowth: planned {times(planned, 'block compute')} than "
                f"{speed.get('baseline_epochs', 0):g} epochs of the complete {model}; measured "
                + (f"{times(measured, 'wall time')} (at this run's complete-{model} throughput{search})"
                   if measured else "not available (no complete-model stage ran)"))

    def attach(self, task: Any, subset_loss: Optional[SubsetLoss] = None) -> None:
        """Give ``task`` the trainer's optional growth hooks (engine.trainer.Task), all delegating
        here; ``subset_loss`` is the task's Eq. 8 loss."""
        self.subset_loss = subset_loss
        line = getattr(task, "search_subset_line", None)
        if line:
            self.log(line)
        idx = getattr(task, "search_indices", None)
        self.subset_images = len(idx) if idx is not None else None
        task.growth = self
        task.prepare_stage = self.prepare_stage
        task.before_step = self.before_step
        task.after_step = self.after_step
        task.state_dict = self.state_dict
        task.load_state_dict = self.load_state_dict
        task.planned_speedup = self.planned_speedup
        task.ddp_find_unused_parameters = True      # inactive blocks get no gradient

    # ---- hooks ----------------------------------------------------------------------------------
    def _ensure_emas(self, model: nn.Module) -> None:
        """MoGrow's momentum network and AutoProg's scoring EMA, built on the model's device at the
        first stage start (a resumed run: loaded from the checkpoint's state)."""
        wanted = {"momentum": (self.cfg.operator == "mogrow", self.cfg.momentum),
                  "scorer": (self.auto is not None, self.cfg.score_momentum)}
        for name, (needed, decay) in wanted.items():
            if not needed or getattr(self, name) is not None:
                continue
            ema = WeightEma(model, decay, warmup=self.cfg.momentum_warmup)
            if name in self._pending_emas:
                state, updates = self._pending_emas.pop(name)
                ema.load_state_dict(state)
                ema.updates = updates
            setattr(self, name, ema)

    def _emas(self) -> List[WeightEma]:
        return [e for e in (self.momentum, self.scorer) if e is not None]

    def prepare_stage(self, model: nn.Module, ps: PlannedStage, optimizer: Optional[torch.optim.Optimizer]) -> bool:
        """Grow (or search, or choose) at the start of plan stage ``ps``; a stage already entered
        (a resumed run: the decisions come from the checkpoint) only gets its active blocks back.
        Never replaces parameters (False: DDP needs no rebuilding)."""
        if optimizer is None:
            raise RuntimeError("growth does not support a weight EMA copy (checked by the config)")
        self._ensure_emas(model)
        if ps.index > self.entered:
            self._enter(unwrap(model), ps.index, optimizer)
            self.entered = ps.index
        self._stage = self.phases[ps.index]
        if self.supernet is not None:
            per_epoch = ps.steps / ps.sample_epochs if ps.sample_epochs > 0 else ps.steps
            self._phase_start, self._phase_steps = ps.start_step, ps.steps
            self._positions = snapshot_positions(ps.steps, per_epoch, SNAPSHOTS)
        self._activate(self.order if self.supernet is None else self.supernet.order)
        return False

    def before_step(self, model: nn.Module, info: StepInfo) -> StepInfo:
        """The step's sub-network: a supernet phase samples one per step (uniformly, a pure function
        of the step) and, at the snapshot positions, first measures Eq. 8's losses; the returned
        info carries the real input size."""
        if self.supernet is not None:
            done = info.step - self._phase_start
            if done in self._positions and done not in {s["at"] for s in self.snapshots}:
                self._snapshot(unwrap(model), done)
            sub, layers = self.supernet.sample(info.step, self.seed)
            self._activate(layers, sub)
            return dataclasses.replace(info, size=sub.size)
        return dataclasses.replace(info, size=self.current.size)

    def after_step(self, model: nn.Module) -> None:
        for ema in self._emas():
            ema.update(model)

    @property
    def eval_subnet(self) -> SubNet:
        """What evaluations (and pictures) run: the trained sub-network, or in a supernet phase its
        largest candidate."""
        if self.supernet is not None:
            return SubNet(max(c.size for c in self.supernet.candidates), len(self.supernet.order))
        return self.current

    def activate_eval(self) -> SubNet:
        """Make :attr:`eval_subnet`'s blocks active (the next step activates its own again)."""
        sub = self.eval_subnet
        self._activate(self.supernet.order if self.supernet is not None else self.order, sub)
        return sub

    @property
    def complete(self) -> bool:
        """The complete model is active (its checkpoints are the standalone full-size model)."""
        return self.supernet is None and self.current == self.space.full

    # ---- growth -----------------------------------------------------------------------------------
    def _activate(self, layers: Sequence[int], sub: Optional[SubNet] = None, blocks: Optional[nn.Module] = None) -> None:
        blocks = self.blocks if blocks is None else blocks
        blocks.set_active(layers)
        # AdaReg: the regularisation scale of the stage now trained (1 without AdaReg)
        self.reg_fraction = self._fraction(*self._stage) if self.cfg.adareg else 1.0
        if self.drop_path > 0:
            set_drop_path(blocks, layers, self.drop_path * self.reg_fraction)

    def _compact(self, layers: Sequence[int], optimizer: torch.optim.Optimizer) -> Dict[int, int]:
        """Put ``layers`` at slots 0..len-1 (model, optimizer state, EMA networks); returns old -> new slot."""
        perm = compaction(layers, len(self.blocks))
        permute_slots(self.blocks, perm, optimizer, [getattr(e.module, self.attr) for e in self._emas()])
        return {old: new for new, old in enumerate(perm)}

    def _momentum_blocks(self) -> Optional[nn.Module]:
        return getattr(self.momentum.module, self.attr) if self.momentum is not None else None

    @torch.no_grad()
    def _grow_scorer(self, depth: int) -> None:
        """Give the scoring EMA the layers the model just got (call after growing the blocks of
        ``self.order`` to ``depth``, before compacting): its new slots copy their sources within it
        (the official ``load_slice_clone``), or for randinit / identity the model's new layers. The
        plan is a pure function of the order, so it is the one the model's growth used."""
        if self.scorer is None or depth <= len(self.order):
            return
        sb = getattr(self.scorer.module, self.attr)
        copy_within = self.cfg.operator in ("mogrow", "interpolation", "stacking")
        for dst, src in plan_growth(self.order, len(self.blocks), depth, self.cfg.operator).sources:
            copy_block(sb[src] if copy_within else self.blocks[dst], sb[dst])

    @torch.no_grad()
    def _from_momentum(self, model: nn.Module) -> None:
        """MoGrow, Eq. 4: the grown network takes the momentum network's weights (every parameter,
        embeddings and head included; the new blocks already hold their sources' momentum weights)."""
        model.load_state_dict(self.momentum.module.state_dict())

    def _grow_to(self, depth: int, optimizer: torch.optim.Optimizer) -> None:
        if depth > len(self.order):
            plan = grow(self.blocks, self.order, depth, self.cfg.operator, self._momentum_blocks())
            self._grow_scorer(depth)
            reset_optimizer_state(optimizer, [self.blocks[s] for s in plan.new_slots])
            self._compact(plan.order, optimizer)
            self.order = tuple(range(depth))

    def _enter(self, model: nn.Module, j: int, optimizer: torch.optim.Optimizer) -> None:
        k, phase = self.phases[j]
        self._stage = (k, phase)
        if phase == "supernet":
            before = self._measure(model, self.order, self.current) if j > 0 else None
            cands = self.auto.candidates(k)
            sup = build_supernet(self.blocks, self.order, cands, self.cfg.operator, self._momentum_blocks())
            self._grow_scorer(len(sup.order))
            reset_optimizer_state(optimizer, [self.blocks[s] for s in sup.optional])
            new = self._compact(sup.order, optimizer)
            self.supernet = ElasticSupernet(tuple(new[s] for s in sup.base), tuple(range(len(sup.order))),
                                            tuple(new[s] for s in sup.optional), sup.candidates)
            self.snapshots = []
            if self.cfg.operator == "mogrow" and j > 0 and len(sup.order) > len(self.order):
                self._from_momentum(model)            # MoGrow acts where depth grows
            self._log_continuity(k, before, model, self.supernet.order, self.eval_subnet)
            self.log(f"growth stage {k}: supernet of {len(cands)} sub-networks (depth {len(self.order)} -> "
                     f"{len(sup.order)}) for {self.cfg.search_epochs:g} epochs: {', '.join(map(str, cands))}")
            return
        if self.supernet is not None:              # the end of stage k's supernet phase: Eq. 8
            choice = self._select(k, model)
            self._compact(self.supernet.layers(choice.depth), optimizer)
            self.order, self.supernet, self.current = tuple(range(choice.depth)), None, choice
            self.log(f"growth stage {k}: training {choice}")
            return
        target = self.auto.subnet(k) if self.auto is not None else self.space.level(k)
        if target == self.current and j > 0:
            return
        before = self._measure(model, self.order, self.current) if j > 0 else None
        deeper = target.depth > len(self.order)
        self._grow_to(target.depth, optimizer)
        if self.cfg.operator == "mogrow" and j > 0 and deeper:
            self._from_momentum(model)                # MoGrow acts where depth grows
        self.current = target
        if j > 0:
            self._log_continuity(k, before, model, self.order, target)
        self.log(f"growth stage {k}: training {target}")

    def _device(self) -> torch.device:
        return next(self.blocks[0].parameters()).device

    def _measure(self, model: nn.Module, layers: Sequence[int], sub: SubNet) -> Optional[float]:
        """The subset loss of ``layers`` at ``sub.size`` (eval mode, no gradients, the RNG untouched
        so a resumed run stays bit-for-bit); None without the task's subset_loss. The caller's
        prepare_stage activates the stage's blocks again afterwards."""
        if self.subset_loss is None:
            return None
        was_training = model.training
        model.eval()
        dev = self._device()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                self._activate(layers, sub)
                return float(self.subset_loss(model, sub.size))
        finally:
            model.train(was_training)

    def _log_continuity(self, k: int, before: Optional[float], model: nn.Module, layers: Sequence[int],
                        sub: SubNet) -> None:
        """Log ``growth stage K: subset loss before A, after B`` (B: the grown model, at ``sub``)."""
        if before is None:
            return
        after = self._measure(model, layers, sub)
        self.continuity.append({"stage": k, "before": before, "after": after})
        self.log(f"growth stage {k}: subset loss before {before:.4f}, after {after:.4f} ({sub})")

    def _snapshot(self, model: nn.Module, at: int) -> None:
        """One Eq. 8 measurement of every candidate: the subset loss of the scoring EMA in train mode
        (drop path on, RNG forked so training stays bit-for-bit) and, at the first snapshot with
        ``growth.runtime=measured``, its forward+backward seconds per image. Ranks averaged."""
        if self.subset_loss is None:
            raise RuntimeError("AutoProg needs the task's subset_loss to choose a sub-network")
        t0 = time.perf_counter()
        net = self.scorer.module
        blocks = getattr(net, self.attr)
        cands = self.supernet.candidates
        timed = self.cfg.runtime == "measured" and not self.snapshots
        losses, times = [], []
        dev = self._device()
        net.train()
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                if timed:                             # an untimed pass first: allocations, caches, kernels
                    self._activate(self.supernet.layers(cands[0].depth), cands[0], blocks)
                    self._time_step(net, cands[0].size)
                for c in cands:
                    self._activate(self.supernet.layers(c.depth), c, blocks)
                    with torch.no_grad():
                        losses.append(float(self.subset_loss(net, c.size)))
                    if timed:
                        times.append(self._time_step(net, c.size))
        finally:
            net.eval()
            self._activate(self.supernet.order, None, blocks)
        values = _mean_over_ranks(losses + times, dev)
        self.snapshots.append({"at": at, "losses": values[:len(cands)], "times": values[len(cands):] or None})
        self.search_seconds += time.perf_counter() - t0

    def _time_step(self, net: nn.Module, size: int) -> float:
        """Forward+backward seconds per image of ``net``'s active sub-network at ``size`` (the official
        ``test_throughput``), on the EMA copy so the model's gradients and optimizer stay untouched."""
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            self._sync()
            t0 = time.perf_counter()
            self.subset_loss(net, size, backward=True)
            self._sync()
            return (time.perf_counter() - t0) / (self.subset_images or self.cfg.search_images)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def _sync(self) -> None:
        if self._device().type == "cuda":
            torch.cuda.synchronize(self._device())

    def _select(self, k: int, model: nn.Module) -> SubNet:
        """Eq. 8 over the supernet's candidates: the mean snapshot loss (the last one taken now, at
        the phase's end) and the measured (or FLOPs-proxy) runtime."""
        t0 = time.perf_counter()
        cands = self.supernet.candidates
        if len(cands) == 1:
            choice = cands[0]
            self.auto = self.auto.decide(choice)
            self.selections.append({"stage": k, "alpha": 0.0, "choice": [choice.size, choice.depth], "snapshots": 0,
                                    "candidates": [{"size": choice.size, "depth": choice.depth}]})
            self.log(f"AutoProg stage {k}: one candidate, {choice}")
            return choice
        if self._phase_steps not in {s["at"] for s in self.snapshots}:
            self._snapshot(model, self._phase_steps)
        losses = {c: sum(s["losses"][i] for s in self.snapshots) / len(self.snapshots) for i, c in enumerate(cands)}
        measured = next((s["times"] for s in self.snapshots if s["times"]), None)
        costs = ({c: measured[i] for i, c in enumerate(cands)} if self.cfg.runtime == "measured" and measured
                 else {c: self.cost(c) / self.cost(self.space.full) for c in cands})
        try:
            sel = select_subnet(losses, costs, self.cfg.alpha)
        except GrowthError as e:                  # e.g. a non-finite loss: stop rather than choose blindly
            raise GrowthError(f"AutoProg stage {k}: cannot choose a sub-network: {e}") from None
        self.auto = self.auto.decide(sel.choice)
        rec = {"stage": k, "alpha": sel.alpha, "choice": [sel.choice.size, sel.choice.depth],
               "snapshots": len(self.snapshots), "runtime": self.cfg.runtime if measured else "flops",
               "candidates": [{"size": c.size, "depth": c.depth, "loss": losses[c], "cost": costs[c],
                               "flops": self.cost(c) / self.cost(self.space.full), "score": sel.scores[c],
                               "snapshot_losses": [s["losses"][i] for s in self.snapshots]}
                              for i, c in enumerate(cands)]}
        self.selections.append(rec)
        self.snapshots = []
        unit = "s/img" if self.cfg.runtime == "measured" and measured else "of full FLOPs"
        rows = ", ".join(f"{c}: loss {losses[c]:.4f} T {costs[c]:.3g} score {sel.scores[c]:.4g}" for c in cands)
        self.log(f"AutoProg stage {k}: alpha {sel.alpha:.3f} (mean of {rec['snapshots']} snapshots, T in {unit}); "
                 f"{rows}; chosen {sel.choice}")
        self.search_seconds += time.perf_counter() - t0
        return sel.choice

    # ---- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        sup = self.supernet
        return {"schedule": self.cfg.schedule, "entered": self.entered, "order": list(self.order),
                "current": [self.current.size, self.current.depth],
                "supernet": None if sup is None else {
                    "base": list(sup.base), "order": list(sup.order), "optional": list(sup.optional),
                    "candidates": [[c.size, c.depth] for c in sup.candidates]},
                "autoprog": self.auto.to_dict() if self.auto is not None else None,
                "selections": list(self.selections), "snapshots": list(self.snapshots),
                "search_seconds": self.search_seconds,
                "momentum": self.momentum.state_dict() if self.momentum is not None else None,
                "momentum_updates": self.momentum.updates if self.momentum is not None else None,
                "scorer": self.scorer.state_dict() if self.scorer is not None else None,
                "scorer_updates": self.scorer.updates if self.scorer is not None else None}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore before the trainer prepares the checkpoint's stage (so it does not grow again)."""
        if not state or state.get("schedule") != self.cfg.schedule:
            raise ConfigError(f"the resume checkpoint has no growth state for growth.schedule={self.cfg.schedule} "
                              "(it was written by a run without it); use a new train.output_dir")
        self.entered = int(state["entered"])
        self.order = tuple(int(s) for s in state["order"])
        self.current = SubNet(*map(int, state["current"]))
        sup = state.get("supernet")
        self.supernet = None if sup is None else ElasticSupernet(
            tuple(sup["base"]), tuple(sup["order"]), tuple(sup["optional"]),
            tuple(SubNet(int(s), int(d)) for s, d in sup["candidates"]))
        if state.get("autoprog") is not None:
            self.auto = AutoProg.from_dict(state["autoprog"])
        self.selections = list(state.get("selections") or [])
        self.snapshots = list(state.get("snapshots") or [])
        self.search_seconds = float(state.get("search_seconds") or 0.0)
        for name, needed in (("momentum", self.cfg.operator == "mogrow"), ("scorer", self.auto is not None)):
            if not needed:
                continue
            if state.get(name) is None:
                what = "MoGrow momentum network" if name == "momentum" else "AutoProg scoring EMA"
                raise ConfigError(f"the resume checkpoint has no {what} (it was written by an older version); "
                                  "use a new train.output_dir")
            # a checkpoint from before the warm-up: its EMA is past any warm-up (the constant m)
            updates = state.get(f"{name}_updates")
            updates = int(updates) if updates is not None else 10 ** 9
            ema = getattr(self, name)
            if ema is not None:
                ema.load_state_dict(state[name])
                ema.updates = updates
            else:
                self._pending_emas[name] = (state[name], updates)

    def summary(self) -> Dict[str, Any]:
        """What the run chose and planned (for logs and summary.json)."""
        sched = None
        try:
            sched = [[s.size, s.depth] for s in (self.auto.schedule() if self.auto is not None else self.prog.schedule())]
        except GrowthError:
            pass
        return {"schedule": self.cfg.schedule, "operator": self.cfg.operator, "subnets": sched,
                "planned_compute": self.planned_compute(), "selections": self.selections,
                "search_seconds": self.search_seconds}
