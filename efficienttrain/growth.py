"""AutoProg (CVPR 2022) progressive growth as schedules: "what does this step look like" now says a
model size (input size = number of patches, and depth) beside the curriculum's answer.

Pure Python (no torch): the growth space, the manual ``Prog`` schedule, the ``AutoProg`` schedule
value (stages, supernet phases, the sub-networks chosen so far), the sub-network selection of Eq. 8
and AdaReg. The operators on blocks and the elastic supernet live in :mod:`efficienttrain.growth_ops`.

Choices the paper leaves open, and what this module does (each also at its definition):

- Rounding (Sec. 5, "round the results to valid integer values"): the stage ratios are the
  ``num_stages`` equispaced values from ``s1`` to 1 (0.5, 0.667, 0.833, 1 for ``0.5 Omega``; 0.4,
  0.6, 0.8, 1 for ``0.4 Omega``). Input size: ``final_size * s`` rounded to the nearest multiple of
  ``multiple_of`` (halves up, at least ``multiple_of``; :func:`curriculum.round_size`). With
  ``multiple_of`` = the patch size this is "n = s * n_full rounded to an integer", the paper's rule;
  the official code rounds sizes to multiples of 32 (pass ``multiple_of=32`` to get 128/160/192/224).
  Depth: ``final_depth * s`` rounded to the nearest integer (halves up), at least 1.
- Candidates of a searched stage (Eq. 8's Lambda_k), as the official code (changlin31/AutoProg,
  ``main_prog.py``) draws them from the distinct sizes and depths of the space: stage 0 searches
  {first, middle, last} sizes x {first, middle, last} depths; a later stage k searches at most 2
  sizes (the last chosen one and the next) x 3 depths (from the next depth after the last chosen
  one, so depth grows every stage until it is complete). The paper's Sec. 4 words it as
  "sub-networks not smaller than the last one"; the official set is smaller (at most 6) so each
  candidate gets a useful share of the supernet's steps.
- Which stages search: every stage but the last (the official code; ``search_first=False`` trains
  the smallest sub-network in stage 0 instead). A searched stage starts with ``search_epochs``
  (2, Sec. 4.2) of supernet training, part of the budget, then trains the chosen sub-network for
  the rest of the stage; the last stage is always the complete model (Sec. 3.1).
- Scoring (the official code; the controller in :mod:`engine.progressive` does the measuring):
  a candidate's loss is the mean of 5 snapshots over the supernet phase's last epoch
  (:func:`snapshot_positions`), taken with a momentum (EMA) copy of the supernet in train mode, and
  its runtime T the measured forward+backward time (or the block-FLOPs proxy :func:`vit_cost`).
- The balancing factor alpha of Eq. 6/8 ("dynamically chosen by balancing the scores for all the
  candidate sub-networks"): see :func:`balance_alpha`.
- AdaReg (Sec. 5.3) by stage index, as the official code's ``progressive_schedule``: stage k of K
  uses the fraction k / (K - 1) of the full regularisation (:func:`stage_fraction`), a supernet
  phase the full one (the official search trains with the final AugReg).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from .curriculum import Curriculum, CurriculumError, Stage, round_size

PHASES = ("train", "supernet")
OMEGA = {"0.5": 0.5, "0.4": 0.4}          # the paper's grow spaces, by their s1
DEFAULT_SEARCH_EPOCHS = 2.0                # Sec. 4.2: rank sub-networks after two epochs
_EPS = 1e-9


class GrowthError(CurriculumError):
    """A growth space, schedule, operator or selection request that cannot be honoured."""


@dataclass(frozen=True)
class SubNet:
    """One sub-network of the growth space: input size (pixels; number of patches = (size/p)^2) and depth."""

    size: int
    depth: int

    def __str__(self) -> str:
        return f"{self.size}px x {self.depth} blocks"


def _round_depth(x: float) -> int:
    return max(1, int(math.floor(x + 0.5 + _EPS)))


@dataclass(frozen=True)
class GrowthSpace:
    """The grow space Omega (Sec. 3.2 / 5): per stage k, a ratio s_k and the rounded size and depth.

    ``sizes[k]`` / ``depths[k]`` are stage k of the uniform schedule (both scaled by ``ratios[k]``);
    the candidate sub-networks are every (size, depth) pair of these values.
    """

    final_size: int
    final_depth: int
    ratios: Tuple[float, ...]
    sizes: Tuple[int, ...]
    depths: Tuple[int, ...]
    multiple_of: int

    @classmethod
    def build(cls, final_size: int, final_depth: int, s1: float = 0.5, num_stages: int = 4,
              multiple_of: int = 16) -> "GrowthSpace":
        """The grow space ``s1 Omega``: ``num_stages`` equispaced ratios from ``s1`` to 1 (rounding:
        see the module docstring). ``multiple_of`` is the patch size for the paper's rule."""
        if not (isinstance(num_stages, int) and num_stages >= 1):
            raise GrowthError(f"growth num_stages must be an integer >= 1, got {num_stages!r}")
        if not 0.0 < s1 <= 1.0:
            raise GrowthError(f"growth s1 (the initial scaling ratio) must be in (0, 1], got {s1!r}")
        if not (isinstance(final_depth, int) and final_depth >= 1):
            raise GrowthError(f"growth final_depth must be an integer >= 1, got {final_depth!r}")
        if num_stages == 1:
            ratios: Tuple[float, ...] = (1.0,)
        else:
            ratios = tuple(s1 + (1.0 - s1) * k / (num_stages - 1) for k in range(num_stages))
        sizes = tuple(round_size(final_size * s, multiple_of, final_size) for s in ratios)
        depths = tuple(min(_round_depth(final_depth * s), final_depth) for s in ratios)
        return cls(int(final_size), int(final_depth), ratios, sizes, depths, int(multiple_of))

    @classmethod
    def omega(cls, name: str, final_size: int, final_depth: int, multiple_of: int = 16) -> "GrowthSpace":
        """The paper's named spaces: ``"0.5"`` (default) or ``"0.4"`` (4 stages each)."""
        if str(name) not in OMEGA:
            raise GrowthError(f"unknown grow space {name!r}; allowed: {', '.join(OMEGA)} (the s1 of 's1 Omega')")
        return cls.build(final_size, final_depth, OMEGA[str(name)], 4, multiple_of)

    @property
    def num_stages(self) -> int:
        return len(self.ratios)

    @property
    def s1(self) -> float:
        return self.ratios[0]

    def level(self, k: int) -> SubNet:
        """Stage ``k`` of the uniform linear schedule (both dimensions scaled by ``ratios[k]``)."""
        return SubNet(self.sizes[k], self.depths[k])

    @property
    def smallest(self) -> SubNet:
        return self.level(0)

    @property
    def full(self) -> SubNet:
        return SubNet(self.final_size, self.final_depth)

    def candidates(self) -> Tuple[SubNet, ...]:
        """Every distinct (size, depth) of the space, sorted by depth then size."""
        return tuple(SubNet(s, d) for d in sorted(set(self.depths)) for s in sorted(set(self.sizes)))

    @property
    def distinct_sizes(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.sizes)))

    @property
    def distinct_depths(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.depths)))

    def search_space(self, last: Optional[SubNet]) -> Tuple[SubNet, ...]:
        """Lambda_k of Eq. 8 as the official code draws it (module docstring): ``last=None`` for
        stage 0 ({first, middle, last}^2), else the stage grows from the sub-network ``last``
        (at most 2 sizes from its size x 3 depths after its depth)."""
        sizes, depths = self.distinct_sizes, self.distinct_depths

        def ends(xs: Tuple[int, ...]) -> Tuple[int, ...]:
            return tuple(sorted({xs[0], xs[len(xs) // 2], xs[-1]}))

        if last is None:
            pick_s, pick_d = ends(sizes), ends(depths)
        else:
            if last.size not in sizes or last.depth not in depths:
                raise GrowthError(f"{last} is not a sub-network of this growth space (sizes {list(sizes)}, "
                                  f"depths {list(depths)})")
            r, d = sizes.index(last.size), depths.index(last.depth)
            d = min(d + 1, len(depths) - 1)          # depth grows every stage (until it is complete)
            pick_s, pick_d = sizes[r:r + 2], depths[d:d + 3]
        return tuple(SubNet(s, dd) for dd in pick_d for s in pick_s)

    def to_dict(self) -> Dict[str, Any]:
        return {"final_size": self.final_size, "final_depth": self.final_depth, "ratios": list(self.ratios),
                "sizes": list(self.sizes), "depths": list(self.depths), "multiple_of": self.multiple_of}


@dataclass(frozen=True)
class GrowthStage:
    """What one training step looks like on the growth axis.

    ``phase`` is ``"train"`` (train sub-network (size, depth)) or ``"supernet"`` (train the elastic
    supernet over ``candidates``, one sampled sub-network per step; size/depth are then its largest
    extent). ``reg_fraction`` in [0, 1] is the AdaReg position (:func:`stage_fraction`, 1 in a
    supernet phase; :func:`adareg`).
    """

    stage_index: int
    size: int
    depth: int
    phase: str = "train"
    candidates: Tuple[SubNet, ...] = ()
    reg_fraction: float = 1.0

    @property
    def subnet(self) -> SubNet:
        return SubNet(self.size, self.depth)


def stage_fraction(k: int, num_stages: int) -> float:
    """AdaReg's position of growth stage ``k`` of ``num_stages``: k / (K - 1), 0 for the first stage
    and 1 for the last (the official code's ``progressive_schedule`` spaces every regularisation
    linearly over the stage index; the paper gives only the end points)."""
    if not 0 <= k < num_stages:
        raise GrowthError(f"stage {k} is outside 0..{num_stages - 1}")
    return 1.0 if num_stages == 1 else k / (num_stages - 1)


def snapshot_positions(phase_steps: int, epoch_steps: float, count: int = 5) -> Tuple[int, ...]:
    """When Eq. 8's losses are measured in a supernet phase of ``phase_steps`` optimizer steps:
    after how many of its steps, ``count`` evenly spaced over its last epoch (``epoch_steps``
    steps, the whole phase if shorter), its start and end included. The official code: 5 (the last
    search epoch's start and every quarter of it); a phase too short for 5 distinct positions
    gets fewer."""
    if phase_steps < 1 or count < 2:
        raise GrowthError(f"snapshot_positions: need phase_steps >= 1 and count >= 2, got {phase_steps}, {count}")
    window = min(phase_steps, max(1, int(round(epoch_steps))))
    start = phase_steps - window
    return tuple(sorted({start + int(round(window * i / (count - 1))) for i in range(count)}))


def _stage_of(progress: float, num_stages: int) -> int:
    if not -_EPS <= progress <= 1.0 + _EPS:
        raise GrowthError(f"budget position must be in [0, 1], got {progress}")
    return min(max(int(math.floor(progress * num_stages + _EPS)), 0), num_stages - 1)


CostFn2 = Callable[[SubNet], float]


def vit_cost(patch_size: int, dim: Optional[int] = None) -> CostFn2:
    """Per-sample cost of a sub-network for planned savings: blocks x tokens, or with ``dim`` the
    block FLOPs depth * (12 N D^2 + 2 N^2 D) (qkv, proj, MLP ratio 4, and the two attention matmuls)."""
    def cost(sub: SubNet) -> float:
        n = (sub.size / patch_size) ** 2
        return sub.depth * (n if dim is None else 12.0 * n * dim * dim + 2.0 * n * n * dim)

    return cost


def schedule_compute(subnets: Sequence[SubNet], shares: Sequence[float], full: SubNet, cost: CostFn2) -> float:
    """Training compute of a schedule relative to training ``full`` for the same epochs."""
    if len(subnets) != len(shares):
        raise GrowthError(f"{len(subnets)} sub-networks but {len(shares)} shares")
    return sum(sh * cost(s) for s, sh in zip(subnets, shares)) / cost(full)


@dataclass(frozen=True)
class Prog:
    """The manual uniform linear schedule (Sec. 3.2): K equal-epoch stages, stage k training
    ``space.level(k)`` (s grows linearly from s1 = 0.5 to 1, quantised to the K stages of Sec. 5)."""

    space: GrowthSpace

    def schedule(self) -> Tuple[SubNet, ...]:
        return tuple(self.space.level(k) for k in range(self.space.num_stages))

    def at(self, progress: float) -> GrowthStage:
        """The growth stage at budget position ``progress`` in [0, 1]."""
        k = _stage_of(progress, self.space.num_stages)
        sub = self.space.level(k)
        return GrowthStage(k, sub.size, sub.depth, "train", (), stage_fraction(k, self.space.num_stages))

    def compute(self, cost: CostFn2) -> float:
        k = self.space.num_stages
        return schedule_compute(self.schedule(), [1.0 / k] * k, self.space.full, cost)

    def curriculum(self, magnitude: float = 9.0, adaptive: bool = False) -> Curriculum:
        """The input-size axis as a :class:`Curriculum` (equal-epoch stages) for the existing data
        path; RandAug magnitude constant, or scaled by AdaReg when ``adaptive``."""
        k = self.space.num_stages
        stages = tuple(Stage(size=s.size, share=1.0 / k,
                             magnitude=adareg(stage_fraction(i, k), magnitude, 0.0, 0.0).magnitude
                             if adaptive else float(magnitude)) for i, s in enumerate(self.schedule()))
        return Curriculum("prog", stages, "epochs", "AutoProg's manual uniform linear growth (Prog)")


@dataclass(frozen=True)
class AutoProg:
    """The AutoProg schedule as a value: stage layout, supernet phases and the sub-networks chosen
    so far (``decisions``, one per searched stage, in order). Checkpoint it with :meth:`to_dict`.

    A searched stage k starts with ``search_epochs`` of supernet training over ``candidates(k)``
    (these epochs are part of the budget: weight recycling), then trains the sub-network passed to
    :meth:`decide` (normally :func:`select_subnet`'s choice) for the rest of the stage.
    """

    space: GrowthSpace
    epochs: float
    search_epochs: float = DEFAULT_SEARCH_EPOCHS
    search_first: bool = True
    decisions: Tuple[SubNet, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "decisions", tuple(SubNet(int(d.size), int(d.depth)) for d in self.decisions))
        if not self.epochs > 0:
            raise GrowthError(f"autoprog epochs must be > 0, got {self.epochs!r}")
        if self.searched_stages and not 0 < self.search_epochs < self.stage_epochs - _EPS:
            raise GrowthError(
                f"autoprog search_epochs={self.search_epochs} must be > 0 and shorter than a stage "
                f"({self.epochs} epochs / {self.space.num_stages} stages = {self.stage_epochs:g} epochs)")
        if len(self.decisions) > len(self.searched_stages):
            raise GrowthError(f"autoprog has {len(self.decisions)} decisions but only "
                              f"{len(self.searched_stages)} searched stages {list(self.searched_stages)}")
        for i, d in enumerate(self.decisions):
            k = self.searched_stages[i]
            allowed = self.candidates(k)
            if d not in allowed:
                raise GrowthError(f"autoprog stage {k}: sub-network {d} is not in its growth space; "
                                  f"allowed: {', '.join(map(str, allowed))}")

    @property
    def stage_epochs(self) -> float:
        return self.epochs / self.space.num_stages

    @property
    def searched_stages(self) -> Tuple[int, ...]:
        k = self.space.num_stages
        return tuple(i for i in range(k - 1) if i > 0 or self.search_first)

    @property
    def pending(self) -> Optional[int]:
        """The next searched stage still waiting for its decision (None when all are made)."""
        n = len(self.decisions)
        return self.searched_stages[n] if n < len(self.searched_stages) else None

    def subnet(self, k: int) -> SubNet:
        """psi_k*: the sub-network trained in stage ``k`` (after its supernet phase)."""
        if not 0 <= k < self.space.num_stages:
            raise GrowthError(f"stage {k} is outside 0..{self.space.num_stages - 1}")
        if k == self.space.num_stages - 1:
            return self.space.full
        if k in self.searched_stages:
            i = self.searched_stages.index(k)
            if i >= len(self.decisions):
                raise GrowthError(f"autoprog stage {k}: its sub-network is chosen at the end of its supernet "
                                  f"phase (epoch {k * self.stage_epochs + self.search_epochs:g}); not decided yet")
            return self.decisions[i]
        return self.space.smallest

    def base(self, k: int) -> SubNet:
        """psi_{k-1}*: the sub-network stage ``k`` grows from (the smallest for stage 0)."""
        return self.space.smallest if k == 0 else self.subnet(k - 1)

    def candidates(self, k: int) -> Tuple[SubNet, ...]:
        """Lambda_k: the sub-networks stage ``k``'s supernet holds (:meth:`GrowthSpace.search_space`)."""
        return self.space.search_space(None if k == 0 else self.base(k))

    def at(self, progress: float) -> GrowthStage:
        """The growth stage at budget position ``progress`` (fraction of ``epochs``) in [0, 1]."""
        k = _stage_of(progress, self.space.num_stages)
        local = progress * self.epochs - k * self.stage_epochs
        if k in self.searched_stages and local < self.search_epochs - _EPS:
            cands = self.candidates(k)
            top = SubNet(max(c.size for c in cands), max(c.depth for c in cands))
            return GrowthStage(k, top.size, top.depth, "supernet", cands, 1.0)
        sub = self.subnet(k)
        return GrowthStage(k, sub.size, sub.depth, "train", (), stage_fraction(k, self.space.num_stages))

    def decide(self, choice: SubNet) -> "AutoProg":
        """A copy with ``choice`` recorded for the pending searched stage."""
        if self.pending is None:
            raise GrowthError(f"autoprog: every searched stage {list(self.searched_stages)} is already decided")
        return AutoProg(self.space, self.epochs, self.search_epochs, self.search_first, self.decisions + (choice,))

    def schedule(self) -> Tuple[SubNet, ...]:
        """Psi* = (psi_k*) for every stage (needs all decisions)."""
        return tuple(self.subnet(k) for k in range(self.space.num_stages))

    def compute(self, cost: CostFn2) -> float:
        """Planned training compute relative to the complete model for the same epochs; a supernet
        phase costs the mean of its candidates (one uniformly sampled sub-network per step)."""
        total = 0.0
        for k in range(self.space.num_stages):
            train = self.stage_epochs
            if k in self.searched_stages:
                cands = self.candidates(k)
                total += self.search_epochs * sum(cost(c) for c in cands) / len(cands)
                train -= self.search_epochs
            total += train * cost(self.subnet(k))
        return total / (self.epochs * cost(self.space.full))

    def to_dict(self) -> Dict[str, Any]:
        return {"space": self.space.to_dict(), "epochs": self.epochs, "search_epochs": self.search_epochs,
                "search_first": self.search_first, "decisions": [[d.size, d.depth] for d in self.decisions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AutoProg":
        sp = data["space"]
        space = GrowthSpace(int(sp["final_size"]), int(sp["final_depth"]), tuple(map(float, sp["ratios"])),
                            tuple(map(int, sp["sizes"])), tuple(map(int, sp["depths"])), int(sp["multiple_of"]))
        return cls(space, float(data["epochs"]), float(data["search_epochs"]), bool(data["search_first"]),
                   tuple(SubNet(int(s), int(d)) for s, d in data["decisions"]))


def sample_candidate(candidates: Sequence[SubNet], step: int, seed: int = 0) -> SubNet:
    """The sub-network a supernet step trains (uniform, Sec. 4.3: one per step). A pure function of
    (seed, step), so a resumed run samples exactly what the uninterrupted one did."""
    if not candidates:
        raise GrowthError("sample_candidate: no candidates")
    return candidates[random.Random(f"autoprog:{seed}:{step}").randrange(len(candidates))]


# ---- Eq. 8: choosing the sub-network -----------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The outcome of Eq. 8: the chosen sub-network, the alpha used and every candidate's score."""

    choice: SubNet
    alpha: float
    scores: Dict[SubNet, float]


def _check_measurements(losses: Mapping[SubNet, float], costs: Mapping[SubNet, float]) -> None:
    if not losses:
        raise GrowthError("select_subnet: no candidate losses were given")
    missing = [str(c) for c in losses if c not in costs]
    if missing:
        raise GrowthError(f"select_subnet: no cost for candidate(s) {missing}")
    for what, table in (("loss", losses), ("cost", costs)):
        for c in losses:
            v = table[c]
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise GrowthError(f"select_subnet: {what} of {c} must be a finite number > 0, got {v!r}")


def balance_alpha(losses: Mapping[SubNet, float], costs: Mapping[SubNet, float]) -> float:
    """alpha of Eq. 6/8, "dynamically chosen by balancing the scores for all the candidates".

    The paper gives no formula. Here: fit the trend L ~ C * T^-a over the candidates by least squares
    on (log T, log L) and take alpha = max(a, 0). Then L * T^alpha is flat along the trend: a
    candidate wins by lying below the loss-versus-cost trend of its peers, not by being large or
    small. (The official code fits the same power law in linear space with scipy's curve_fit.)
    Equal costs, or a single candidate, give alpha = 0 (pure loss). Scaling every cost by one
    constant does not change the choice, so relative costs are enough.
    """
    _check_measurements(losses, costs)
    xs = [math.log(costs[c]) for c in losses]
    ys = [math.log(losses[c]) for c in losses]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var <= 1e-18:
        return 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return max(-slope, 0.0)


def select_subnet(losses: Mapping[SubNet, float], costs: Mapping[SubNet, float],
                  alpha: Optional[float] = None) -> Selection:
    """Eq. 8: psi_k* = argmin over the measured candidates of L(psi) * T(psi)^alpha.

    ``losses``: each candidate's training loss on the fixed-augmentation search subset, measured
    with the supernet's weights after its training epochs (Eq. 9). ``costs``: its runtime per step
    (measured, as the paper) or a proxy such as :func:`vit_cost`. ``alpha``: None for
    :func:`balance_alpha`. Ties (scores within 1e-12 relative) go to the cheaper, then shallower,
    then smaller-input sub-network.
    """
    _check_measurements(losses, costs)
    a = balance_alpha(losses, costs) if alpha is None else float(alpha)
    if not (math.isfinite(a) and a >= 0):
        raise GrowthError(f"select_subnet: alpha must be a finite number >= 0, got {alpha!r}")
    scores = {c: losses[c] * costs[c] ** a for c in losses}
    best = min(scores.values())
    tied = [c for c in scores if scores[c] <= best * (1 + 1e-12)]
    choice = min(tied, key=lambda c: (costs[c], c.depth, c.size))
    return Selection(choice, a, scores)


# ---- AdaReg ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Regularisation:
    """Regularisation strengths for one step: RandAug magnitude, stochastic depth and random erasing."""

    magnitude: float
    drop_path: float
    reprob: float


def adareg(fraction: float, magnitude: float, drop_path: float, reprob: float) -> Regularisation:
    """AdaReg (Sec. 5.3): with the full-model values given, RandAug magnitude goes linearly from 0.5x
    to 1x and the stochastic-depth and random-erase probabilities from 0 to 1x as ``fraction`` goes
    0 -> 1 (use :func:`stage_fraction`, carried by :class:`GrowthStage`). The paper uses it for
    VOLO and not for DeiT (which does not converge with it)."""
    if not -_EPS <= fraction <= 1.0 + _EPS:
        raise GrowthError(f"adareg fraction must be in [0, 1], got {fraction}")
    f = min(max(fraction, 0.0), 1.0)
    return Regularisation(magnitude * (0.5 + 0.5 * f), drop_path * f, reprob * f)
