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
- MoGrow's momentum network (Eq. 3, m = ``growth.momentum``) is a float32 copy updated after every
  optimizer step; it is saved in every checkpoint (task state, with its update count) with the
  AutoProg decisions. Its decay warms up, min(m, (1 + t) / (10 + t)) at update t
  (``growth.momentum_warmup``, :class:`~engine.ema.WeightEma`): with the constant m an EMA of a
  short run is mostly the random initialisation (0.998^45 = 0.91), and MoGrow, which copies the whole
  network from it at every growth, would throw the training away (the demo: 82 % top-1 before a
  growth, 68 % for the constant-0.998 EMA). The official code grows from a separate slow EMA
  (0.9996) and keeps 0.998 for scoring; here Eq. 8 scores the trained supernet itself, so MoGrow's
  one EMA, warmed up, is all it needs (one model copy, not two). Every growth logs the subset loss
  just before and just after it (continuity; the demo's stay within 1.1x).
- Eq. 8's subset is the task's: a seeded class-stratified sample of ``growth.search_images``
  training images (:func:`search_subset`; the paper: 50K random ImageNet images), logged once.
- Eq. 8's loss is measured in eval mode (no drop path, no dropout) on the task's fixed subset,
  and the runtime T(psi) is the block-FLOPs proxy :func:`~efficienttrain.growth.vit_cost`
  (deterministic, so a resumed run chooses what the uninterrupted one chose; the paper measures
  runtime).
- Not implemented: growth of the width (the paper grows patches and depth only), torch.compile
  and the trainer's weight EMA during growth, replay, and ``cpu-lanczos`` (sizes are decided on
  the device at run time).
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from efficienttrain.curriculum import Curriculum, PlannedStage, Stage, StepInfo
from efficienttrain.growth import (AutoProg, GrowthError, GrowthSpace, Prog, SubNet, adareg, capacity_fraction,
                                   select_subnet, vit_cost)
from efficienttrain.growth_ops import (GROWTH_OPS, INTERPOLATING_OPS, ElasticSupernet, build_supernet, compaction,
                                       grow, make_elastic, permute_slots, reset_optimizer_state, set_drop_path)

from .config import ConfigError
from .ema import WeightEma, unwrap

SCHEDULES = ("none", "prog", "autoprog")


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
    momentum: float = 0.998                # MoGrow's momentum network: m of Eq. 3, updated every optimizer step
    momentum_warmup: bool = True           # MoGrow: step t's decay is min(m, (1 + t) / (10 + t)) (warm-up), so in
                                           # short runs the network grown from is not mostly the random
                                           # initialisation (0.998^45 = 0.91); false: the constant m of Eq. 3
    search_epochs: float = 2.0             # autoprog: supernet epochs at the start of each searched stage (budget
                                           # epochs, part of the training: weight recycling)
    search_first: bool = False             # autoprog: also search the first stage (the official code) instead of
                                           # training the smallest sub-network
    search_images: int = 256               # the fixed-augmentation subset Eq. 8's losses (and the growth log's
                                           # continuity check) are measured on: a seeded class-stratified sample
                                           # of N training images (unlabelled data: a seeded uniform sample),
                                           # evaluation transform. The paper: 50000 (ImageNet, full scale)
    alpha: Optional[float] = None          # autoprog: Eq. 8's alpha (null: balanced over the candidates,
                                           # efficienttrain.growth.balance_alpha)
    adareg: bool = False                   # AdaReg: RandAug magnitude 0.5x..1x, drop path and erasing 0..1x with the
                                           # sub-network's capacity (the paper: on for VOLO, off for DeiT)
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
            raise ConfigError(f"{where}.momentum must be in (0, 1) (the paper: 0.998), got {self.momentum}")
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
        if lowfreq == "cpu-lanczos":
            raise ConfigError(f"{where}.schedule={self.schedule} decides each step's input size on the device; "
                              "data.lowfreq=cpu-lanczos resizes in the loader workers: use data.lowfreq=fft or downsample")
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


SubsetLoss = Callable[[nn.Module, int], float]


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

    ``subset_loss(model, size)``: the training loss on the task's fixed subset at input ``size``
    with the model's currently active blocks (AutoProg only). ``drop_path``: the complete model's
    stochastic-depth rate, re-spread over the active blocks at every change.
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
        self.momentum: Optional[WeightEma] = None
        self._pending_momentum: Optional[Tuple[Dict[str, torch.Tensor], int]] = None
        self.entered = -1                       # the last plan stage whose start was prepared
        self.current = self.space.smallest      # the sub-network trained now (supernet: the one it grew from)
        self.order: Tuple[int, ...] = tuple(range(self.current.depth))   # its blocks (compacted: 0..d-1)
        self.supernet: Optional[ElasticSupernet] = None
        self.selections: List[Dict[str, Any]] = []
        self.continuity: List[Dict[str, Any]] = []   # per growth: the subset loss before and after (this process)
        self.reg_fraction = 1.0

    # ---- the plan -----------------------------------------------------------------------------
    def curriculum(self, magnitude: float) -> Curriculum:
        """The run's plan stages: one per growth stage, two (supernet, train) for a searched one.
        RandAug magnitude constant, or by AdaReg with the uniform schedule's capacity per stage."""
        shares = []
        for k, phase in self.phases:
            stage = 1.0 / self.space.num_stages
            if self.auto is not None and k in self.auto.searched_stages:
                part = self.cfg.search_epochs / self.auto.epochs
                stage = part if phase == "supernet" else stage - part
            shares.append(stage)
        shares[-1] = 1.0 - sum(shares[:-1])
        stages = []
        for (k, _), share in zip(self.phases, shares):
            level = self.space.level(k)
            m = adareg(capacity_fraction(self.space, level), magnitude, 0, 0).magnitude if self.cfg.adareg else magnitude
            stages.append(Stage(size=level.size, share=share, magnitude=float(m)))
        desc = ("AutoProg: supernet search of the middle stages' sub-networks" if self.auto is not None
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
            base, level = auto.base(k), self.space.level(k)
            auto = auto.decide(SubNet(max(base.size, level.size), max(base.depth, level.depth)))
        return auto.compute(self.cost)

    def planned_speedup(self) -> float:
        return 1.0 / self.planned_compute()

    def plan_line(self, model: str = "model") -> str:
        """The planned block-FLOPs saving, for the run log before training."""
        note = "; AutoProg stages count as the uniform schedule until chosen" if self.auto is not None else ""
        return (f"growth plan: {self.planned_compute():.1%} of the complete {model}'s block FLOPs for the same "
                f"epochs ({self.planned_speedup():.2f}x less{note})")

    def result_lines(self, speed: Dict[str, Any], model: str = "model") -> str:
        """The chosen schedule, its planned saving and the measured one (``speed``: the trainer's
        speed summary), for the run log after training."""
        measured = speed.get("measured_speedup")
        search = (f", {speed['stage_start_seconds']:.1f} s of it growing and searching at stage starts"
                  if speed.get("stage_starts_measured") else "")
        return (f"{self.describe()}\ngrowth: planned {speed.get('planned_speedup', self.planned_speedup()):.2f}x less "
                f"block compute than {speed.get('baseline_epochs', 0):g} epochs of the complete {model}; measured "
                + (f"{measured:.2f}x less wall time (at this run's complete-{model} throughput{search})"
                   if measured else "not available (no complete-model stage ran)"))

    def attach(self, task: Any, subset_loss: Optional[SubsetLoss] = None) -> None:
        """Give ``task`` the trainer's optional growth hooks (engine.trainer.Task), all delegating
        here; ``subset_loss`` is the task's Eq. 8 loss (AutoProg)."""
        self.subset_loss = subset_loss
        line = getattr(task, "search_subset_line", None)
        if line:
            self.log(line)
        task.growth = self
        task.prepare_stage = self.prepare_stage
        task.before_step = self.before_step
        task.after_step = self.after_step
        task.state_dict = self.state_dict
        task.load_state_dict = self.load_state_dict
        task.planned_speedup = self.planned_speedup
        task.ddp_find_unused_parameters = True      # inactive blocks get no gradient

    # ---- hooks ----------------------------------------------------------------------------------
    def _ensure_momentum(self, model: nn.Module) -> None:
        """MoGrow's momentum network: built on the model's device, at the first stage start."""
        if self.cfg.operator != "mogrow" or self.momentum is not None:
            return
        self.momentum = WeightEma(model, self.cfg.momentum, warmup=self.cfg.momentum_warmup)
        if self._pending_momentum is not None:
            self.momentum.load_state_dict(self._pending_momentum[0])
            self.momentum.updates = self._pending_momentum[1]
            self._pending_momentum = None

    def prepare_stage(self, model: nn.Module, ps: PlannedStage, optimizer: Optional[torch.optim.Optimizer]) -> bool:
        """Grow (or search, or choose) at the start of plan stage ``ps``; a stage already entered
        (a resumed run: the decisions come from the checkpoint) only gets its active blocks back.
        Never replaces parameters (False: DDP needs no rebuilding)."""
        if optimizer is None:
            raise RuntimeError("growth does not support a weight EMA copy (checked by the config)")
        self._ensure_momentum(model)
        if ps.index > self.entered:
            self._enter(unwrap(model), ps.index, optimizer)
            self.entered = ps.index
        self._activate(self.order if self.supernet is None else self.supernet.order)
        return False

    def before_step(self, model: nn.Module, info: StepInfo) -> StepInfo:
        """The step's sub-network: a supernet phase samples one per step (uniformly, a pure function
        of the step); the returned info carries the real input size."""
        if self.supernet is not None:
            sub, layers = self.supernet.sample(info.step, self.seed)
            self._activate(layers, sub)
            return dataclasses.replace(info, size=sub.size)
        return dataclasses.replace(info, size=self.current.size)

    def after_step(self, model: nn.Module) -> None:
        if self.momentum is not None:
            self.momentum.update(model)

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
    def _activate(self, layers: Sequence[int], sub: Optional[SubNet] = None) -> None:
        self.blocks.set_active(layers)
        # AdaReg: the regularisation scale of the sub-network now active (1 without AdaReg)
        self.reg_fraction = capacity_fraction(self.space, sub or self.current) if self.cfg.adareg else 1.0
        if self.drop_path > 0:
            set_drop_path(self.blocks, layers, self.drop_path * self.reg_fraction)

    def _compact(self, layers: Sequence[int], optimizer: torch.optim.Optimizer) -> Dict[int, int]:
        """Put ``layers`` at slots 0..len-1 (model, optimizer state, momentum network); returns old -> new slot."""
        perm = compaction(layers, len(self.blocks))
        others = [self._momentum_blocks()] if self.momentum is not None else []
        permute_slots(self.blocks, perm, optimizer, others)
        return {old: new for new, old in enumerate(perm)}

    def _momentum_blocks(self) -> Optional[nn.Module]:
        return getattr(self.momentum.module, self.attr) if self.momentum is not None else None

    @torch.no_grad()
    def _from_momentum(self, model: nn.Module) -> None:
        """MoGrow, Eq. 4: the grown network takes the momentum network's weights (every parameter,
        embeddings and head included; the new blocks already hold their sources' momentum weights)."""
        model.load_state_dict(self.momentum.module.state_dict())

    def _grow_to(self, depth: int, optimizer: torch.optim.Optimizer) -> None:
        if depth > len(self.order):
            plan = grow(self.blocks, self.order, depth, self.cfg.operator, self._momentum_blocks())
            reset_optimizer_state(optimizer, [self.blocks[s] for s in plan.new_slots])
            self._compact(plan.order, optimizer)
            self.order = tuple(range(depth))

    def _enter(self, model: nn.Module, j: int, optimizer: torch.optim.Optimizer) -> None:
        k, phase = self.phases[j]
        if phase == "supernet":
            before = self._measure(model, self.order, self.current)
            cands = self.auto.candidates(k)
            sup = build_supernet(self.blocks, self.order, cands, self.cfg.operator, self._momentum_blocks())
            reset_optimizer_state(optimizer, [self.blocks[s] for s in sup.optional])
            new = self._compact(sup.order, optimizer)
            self.supernet = ElasticSupernet(tuple(new[s] for s in sup.base), tuple(range(len(sup.order))),
                                            tuple(new[s] for s in sup.optional), sup.candidates)
            if self.cfg.operator == "mogrow":
                self._from_momentum(model)
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
        self._grow_to(target.depth, optimizer)
        if self.cfg.operator == "mogrow" and j > 0:
            self._from_momentum(model)
        self.current = target
        if j > 0:
            self._log_continuity(k, before, model, self.order, target)
        self.log(f"growth stage {k}: training {target}")

    def _measure(self, model: nn.Module, layers: Sequence[int], sub: SubNet) -> Optional[float]:
        """The subset loss of ``layers`` at ``sub.size`` (eval mode, no gradients, the RNG untouched
        so a resumed run stays bit-for-bit); None without the task's subset_loss. The caller's
        prepare_stage activates the stage's blocks again afterwards."""
        if self.subset_loss is None:
            return None
        was_training = model.training
        model.eval()
        dev = next(self.blocks[0].parameters()).device
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

    def _select(self, k: int, model: nn.Module) -> SubNet:
        """Eq. 8 over the supernet's candidates: losses on the fixed subset, FLOPs-proxy runtimes."""
        if self.subset_loss is None:
            raise RuntimeError("AutoProg needs the task's subset_loss to choose a sub-network")
        losses, costs = {}, {}
        was_training = model.training
        model.eval()
        devices = [self.blocks[0].parameters().__next__().device]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
                for c in self.supernet.candidates:
                    self._activate(self.supernet.layers(c.depth), c)
                    losses[c] = float(self.subset_loss(model, c.size))
                    costs[c] = self.cost(c)
        finally:
            model.train(was_training)
        try:
            sel = select_subnet(losses, costs, self.cfg.alpha)
        except GrowthError as e:                  # e.g. a non-finite loss: stop rather than choose blindly
            raise GrowthError(f"AutoProg stage {k}: cannot choose a sub-network: {e}") from None
        self.auto = self.auto.decide(sel.choice)
        rec = {"stage": k, "alpha": sel.alpha, "choice": [sel.choice.size, sel.choice.depth],
               "candidates": [{"size": c.size, "depth": c.depth, "loss": losses[c], "cost": costs[c] / self.cost(
                   self.space.full), "score": sel.scores[c]} for c in self.supernet.candidates]}
        self.selections.append(rec)
        rows = ", ".join(f"{c}: loss {losses[c]:.4f} score {sel.scores[c]:.4g}" for c in self.supernet.candidates)
        self.log(f"AutoProg stage {k}: alpha {sel.alpha:.3f}; {rows}; chosen {sel.choice}")
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
                "selections": list(self.selections),
                "momentum": self.momentum.state_dict() if self.momentum is not None else None,
                "momentum_updates": self.momentum.updates if self.momentum is not None else None}

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
        if self.cfg.operator == "mogrow":
            if state.get("momentum") is None:
                raise ConfigError("the resume checkpoint has no MoGrow momentum network; use a new train.output_dir")
            # a checkpoint from before the warm-up: its EMA is past any warm-up (the constant m)
            updates = state.get("momentum_updates")
            updates = int(updates) if updates is not None else 10 ** 9
            if self.momentum is not None:
                self.momentum.load_state_dict(state["momentum"])
                self.momentum.updates = updates
            else:
                self._pending_momentum = (state["momentum"], updates)

    def summary(self) -> Dict[str, Any]:
        """What the run chose and planned (for logs and summary.json)."""
        sched = None
        try:
            sched = [[s.size, s.depth] for s in (self.auto.schedule() if self.auto is not None else self.prog.schedule())]
        except GrowthError:
            pass
        return {"schedule": self.cfg.schedule, "operator": self.cfg.operator, "subnets": sched,
                "planned_compute": self.planned_compute(), "selections": self.selections}

