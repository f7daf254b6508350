"""EfficientTrain / EfficientTrain++ curricula: what input size, augmentation strength, batch and
replay each training step uses, and one LR schedule over the whole budget.

Vocabulary
- *budget position* ``p`` in [0, 1]: the fraction of the training budget consumed. In ``epochs``
  mode (EfficientTrain, ICCV) the budget is epochs; in ``compute`` mode (EfficientTrain++) it is
  compute, E "equivalent epochs at the final size".
- *sample epochs* of a stage: how many passes' worth of samples the model processes in it.
- *data epochs*: passes of the data loader, i.e. sample epochs / replay_times (replayed samples
  are reused from the buffer instead of loaded again).

Size rounding rule (used whenever sizes are adapted to another final size gamma): a size s is
rounded to the nearest multiple of ``multiple_of`` (halves round up), clamped to at least
``multiple_of`` and at most gamma; gamma itself must be a multiple of ``multiple_of``.
"""
from __future__ import annotations

import bisect
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

CostFn = Callable[[int], float]
BUDGET_MODES = ("epochs", "compute")
DEFAULT_MULTIPLE_OF = 16
MAX_MAGNITUDE = 9.0
_SHARE_TOL = 1e-6


class CurriculumError(ValueError):
    """A curriculum definition or query that cannot be honoured (says what and what is allowed)."""


def pixel_cost(size: int) -> float:
    """Cost of one sample at input size ``size`` under the pixel model (B^2, as the official code)."""
    return float(size) * float(size)


def round_size(size: float, multiple_of: int, final_size: int) -> int:
    """Round ``size`` to the nearest multiple of ``multiple_of`` (halves up), within
    ``[multiple_of, final_size]`` (see the module docstring)."""
    if multiple_of < 1:
        raise CurriculumError(f"multiple_of must be >= 1, got {multiple_of}")
    if final_size % multiple_of:
        raise CurriculumError(
            f"final size {final_size} is not a multiple of multiple_of={multiple_of}; "
            f"allowed final sizes are multiples of {multiple_of} (e.g. {final_size // multiple_of * multiple_of})")
    r = multiple_of * math.floor(size / multiple_of + 0.5)
    return int(min(max(r, multiple_of), final_size))


@dataclass(frozen=True)
class Stage:
    """One stage: input size, RandAug magnitude, budget share and optional per-stage overrides.

    ``magnitude`` holds for the whole stage unless ``magnitude_end`` is given, in which case the
    magnitude moves linearly from ``magnitude`` to ``magnitude_end`` across the stage.
    ``batch_size`` / ``accum_steps`` override the run's global batch and gradient accumulation;
    ``replay_times`` > 1 enables the replay buffer holding ``replay_buffer`` loader batches.
    """

    size: int
    share: float
    magnitude: float = 0.0
    magnitude_end: Optional[float] = None
    batch_size: Optional[int] = None
    accum_steps: Optional[int] = None
    replay_times: int = 1
    replay_buffer: Optional[int] = None

    def magnitude_at(self, frac: float) -> float:
        """RandAug magnitude at fraction ``frac`` (0..1) of this stage."""
        if self.magnitude_end is None:
            return float(self.magnitude)
        return float(self.magnitude + (self.magnitude_end - self.magnitude) * frac)

    def validate(self, where: str) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CurriculumError(f"{where}: {msg}")

        need(isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 1,
             f"size must be a positive integer, got {self.size!r}")
        need(isinstance(self.share, (int, float)) and self.share > 0,
             f"share must be a number > 0, got {self.share!r}")
        for key in ("magnitude", "magnitude_end"):
            v = getattr(self, key)
            need(v is None or (isinstance(v, (int, float)) and v >= 0), f"{key} must be a number >= 0, got {v!r}")
        for key in ("batch_size", "accum_steps", "replay_buffer"):
            v = getattr(self, key)
            need(v is None or (isinstance(v, int) and v >= 1), f"{key} must be a positive integer or null, got {v!r}")
        need(isinstance(self.replay_times, int) and self.replay_times >= 1,
             f"replay_times must be an integer >= 1, got {self.replay_times!r}")
        need(self.replay_times == 1 or self.replay_buffer is not None,
             f"replay_times={self.replay_times} needs replay_buffer (the number of loader batches kept)")


STAGE_KEYS = tuple(f.name for f in fields(Stage))


@dataclass(frozen=True)
class PlannedStage:
    """A stage resolved for a concrete run (budget, dataset size, batch sizes)."""

    index: int
    stage: Stage
    batch_size: int          # global samples per optimizer step
    accum_steps: int         # gradient-accumulation micro-steps per optimizer step
    loader_batch_size: int   # fresh samples per optimizer step (batch_size / replay_times)
    steps: int               # optimizer steps in this stage
    start_step: int
    budget_start: float
    budget_end: float
    sample_epochs: float
    data_epochs: float
    data_epoch_start: float

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def data_epoch_end(self) -> float:
        return self.data_epoch_start + self.data_epochs


@dataclass(frozen=True)
class StepInfo:
    """Everything the training loop needs to know about one optimizer step."""

    step: int
    stage_index: int
    stage_step: int          # step within the stage
    size: int
    magnitude: float
    batch_size: int
    accum_steps: int
    loader_batch_size: int
    replay_times: int
    replay_buffer: Optional[int]
    budget_fraction: float


def warmup_cosine(progress: float, base_lr: float, warmup: float = 0.0, min_lr: float = 0.0) -> float:
    """Linear warmup over the first ``warmup`` fraction of the budget, then half-cosine decay to
    ``min_lr`` at ``progress == 1`` (the MAE schedule, indexed by budget progress instead of epochs)."""
    if not 0.0 <= warmup < 1.0:
        raise CurriculumError(f"warmup fraction must be in [0, 1), got {warmup}")
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return base_lr * p / warmup
    t = (p - warmup) / (1.0 - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Plan:
    """A curriculum resolved into optimizer steps; answers per-step queries."""

    curriculum: "Curriculum"
    epochs: float
    dataset_size: int
    stages: Tuple[PlannedStage, ...]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    def _stage_for_step(self, step: int) -> PlannedStage:
        if not 0 <= step <= self.total_steps:
            raise CurriculumError(f"step {step} is outside the plan (allowed: 0..{self.total_steps})")
        starts = [s.start_step for s in self.stages]
        return self.stages[max(0, bisect.bisect_right(starts, step) - 1)]

    def budget_fraction(self, step: int) -> float:
        """Fraction of the budget consumed before optimizer step ``step`` (1.0 at the end)."""
        ps = self._stage_for_step(step)
        local = min(step - ps.start_step, ps.steps)
        return ps.budget_start + (ps.budget_end - ps.budget_start) * local / ps.steps

    def at(self, step: int) -> StepInfo:
        """What optimizer step ``step`` (0-based, < total_steps) looks like."""
        if not 0 <= step < self.total_steps:
            raise CurriculumError(f"step {step} is outside the plan (allowed: 0..{self.total_steps - 1})")
        ps = self._stage_for_step(step)
        local = step - ps.start_step
        st = ps.stage
        return StepInfo(
            step=step, stage_index=ps.index, stage_step=local, size=st.size,
            magnitude=st.magnitude_at(local / ps.steps), batch_size=ps.batch_size,
            accum_steps=ps.accum_steps, loader_batch_size=ps.loader_batch_size,
            replay_times=st.replay_times, replay_buffer=st.replay_buffer,
            budget_fraction=self.budget_fraction(step))

    def lr(self, step: int, base_lr: float, warmup_epochs: float = 0.0, min_lr: float = 0.0) -> float:
        """One warmup + cosine schedule over budget progress: it never restarts at stage changes.
        ``warmup_epochs`` is measured in the run's budget epochs (scaled to the budget)."""
        return warmup_cosine(self.budget_fraction(step), base_lr, warmup_epochs / self.epochs, min_lr)

    def rows(self) -> List[Dict[str, Any]]:
        return [
            {"stage": p.index, "size": p.stage.size, "magnitude": p.stage.magnitude,
             "magnitude_end": p.stage.magnitude_at(1.0), "share": p.stage.share,
             "batch_size": p.batch_size, "accum_steps": p.accum_steps,
             "replay_times": p.stage.replay_times, "sample_epochs": p.sample_epochs,
             "data_epochs": p.data_epochs, "steps": p.steps, "start_step": p.start_step,
             "end_step": p.end_step, "budget_start": p.budget_start, "budget_end": p.budget_end}
            for p in self.stages
        ]


@dataclass(frozen=True)
class Curriculum:
    """An ordered list of stages plus a budget mode (``epochs`` or ``compute``)."""

    name: str
    stages: Tuple[Stage, ...]
    budget: str = "epochs"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.budget not in BUDGET_MODES:
            raise CurriculumError(f"curriculum {self.name!r}: budget must be one of {BUDGET_MODES}, got {self.budget!r}")
        if not self.stages:
            raise CurriculumError(f"curriculum {self.name!r}: needs at least one stage")
        for i, st in enumerate(self.stages):
            st.validate(f"curriculum {self.name!r}, stage {i}")
        total = sum(st.share for st in self.stages)
        if abs(total - 1.0) > _SHARE_TOL:
            raise CurriculumError(
                f"curriculum {self.name!r}: stage shares sum to {total:.6g}; they must sum to 1")
        largest = max(st.size for st in self.stages)
        if self.stages[-1].size != largest:
            raise CurriculumError(
                f"curriculum {self.name!r}: the last stage (size {self.stages[-1].size}) must use the "
                f"final, largest input size ({largest}); models are evaluated at the final size")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def final_size(self) -> int:
        return self.stages[-1].size

    def boundaries(self) -> List[Tuple[float, float]]:
        """Budget interval [start, end) of every stage."""
        out, acc = [], 0.0
        for st in self.stages:
            out.append((acc, acc + st.share))
            acc += st.share
        return [(a, 1.0 if i == len(out) - 1 else b) for i, (a, b) in enumerate(out)]

    def stage_index_at(self, progress: float) -> int:
        """Index of the stage in force at budget position ``progress`` in [0, 1]."""
        if not 0.0 <= progress <= 1.0:
            raise CurriculumError(f"budget position must be in [0, 1], got {progress}")
        for i, (_, end) in enumerate(self.boundaries()):
            if progress < end:
                return i
        return len(self.stages) - 1

    def stage_at(self, progress: float) -> Stage:
        return self.stages[self.stage_index_at(progress)]

    def magnitude_at(self, progress: float) -> float:
        """RandAug magnitude at budget position ``progress``."""
        i = self.stage_index_at(progress)
        start, end = self.boundaries()[i]
        return self.stages[i].magnitude_at(min((progress - start) / (end - start), 1.0))

    # ---- budget ---------------------------------------------------------------------------
    def sample_epochs(self, epochs: float, cost: CostFn = pixel_cost) -> List[float]:
        """Per stage, passes' worth of samples processed. ``epochs`` is the budget: epochs
        (``epochs`` mode) or equivalent epochs at the final size (``compute`` mode)."""
        if not epochs > 0:
            raise CurriculumError(f"the budget (epochs) must be > 0, got {epochs}")
        if self.budget == "epochs":
            return [st.share * epochs for st in self.stages]
        c_final = cost(self.final_size)
        return [st.share * epochs * c_final / cost(st.size) for st in self.stages]

    def data_epochs(self, epochs: float, cost: CostFn = pixel_cost) -> List[float]:
        """Per stage, passes of the data loader (sample epochs divided by replay times)."""
        return [e / st.replay_times for e, st in zip(self.sample_epochs(epochs, cost), self.stages)]

    def compute(self, epochs: float, cost: CostFn = pixel_cost) -> float:
        """Total training cost in equivalent epochs at the final size."""
        c_final = cost(self.final_size)
        return sum(e * cost(st.size) / c_final for e, st in zip(self.sample_epochs(epochs, cost), self.stages))

    def speedup(self, epochs: float, baseline_epochs: Optional[float] = None, cost: CostFn = pixel_cost) -> float:
        """Computational saving versus the ``baseline`` curriculum (every sample at the final size)
        trained for ``baseline_epochs`` (default: ``epochs``)."""
        baseline_epochs = epochs if baseline_epochs is None else baseline_epochs
        return baseline_epochs / self.compute(epochs, cost)

    def plan(self, epochs: float, dataset_size: int, batch_size: int, accum_steps: int = 1,
             cost: CostFn = pixel_cost) -> Plan:
        """Resolve into optimizer steps for ``dataset_size`` samples and a global ``batch_size``
        per optimizer step (stages may override batch size and accumulation)."""
        if dataset_size < 1:
            raise CurriculumError(f"dataset_size must be >= 1, got {dataset_size}")
        if batch_size < 1 or accum_steps < 1:
            raise CurriculumError(f"batch_size and accum_steps must be >= 1, got {batch_size}, {accum_steps}")
        planned: List[PlannedStage] = []
        step, data_epoch = 0, 0.0
        samples = self.sample_epochs(epochs, cost)
        for i, (st, (b0, b1), se) in enumerate(zip(self.stages, self.boundaries(), samples)):
            bs = st.batch_size or batch_size
            acc = st.accum_steps or accum_steps
            where = f"curriculum {self.name!r}, stage {i}"
            if bs % acc:
                raise CurriculumError(f"{where}: batch size {bs} is not divisible by accum_steps {acc}")
            if bs % st.replay_times:
                raise CurriculumError(f"{where}: batch size {bs} is not divisible by replay_times {st.replay_times}")
            n = max(1, round(se * dataset_size / bs))
            de = se / st.replay_times
            planned.append(PlannedStage(
                index=i, stage=st, batch_size=bs, accum_steps=acc,
                loader_batch_size=bs // st.replay_times, steps=n, start_step=step,
                budget_start=b0, budget_end=b1, sample_epochs=se, data_epochs=de,
                data_epoch_start=data_epoch))
            step += n
            data_epoch += de
        return Plan(self, float(epochs), int(dataset_size), tuple(planned))

    # ---- presentation and I/O ---------------------------------------------------------------
    def table(self, epochs: float, cost: CostFn = pixel_cost) -> List[Dict[str, Any]]:
        """Rows of the stage table: size, magnitude range, budget share, data epochs and their span."""
        rows, start = [], 0.0
        for i, (st, se, de) in enumerate(zip(self.stages, self.sample_epochs(epochs, cost), self.data_epochs(epochs, cost))):
            rows.append({
                "stage": i, "size": st.size, "magnitude_start": st.magnitude_at(0.0),
                "magnitude_end": st.magnitude_at(1.0), "share": st.share,
                "replay_times": st.replay_times, "sample_epochs": se, "data_epochs": de,
                "data_epoch_start": start, "data_epoch_end": start + de})
            start += de
        return rows

    def scaled(self, final_size: int, multiple_of: int = DEFAULT_MULTIPLE_OF) -> "Curriculum":
        """The same curriculum for another final size: every size times final_size / current final
        size, rounded by :func:`round_size`."""
        factor = final_size / self.final_size
        stages = [replace(st, size=round_size(st.size * factor, multiple_of, final_size)) for st in self.stages]
        stages[-1] = replace(stages[-1], size=final_size)
        return replace(self, stages=tuple(stages))

    def to_dict(self) -> Dict[str, Any]:
        stages = [{k: v for k, v in asdict(st).items() if v is not None and not (k == "replay_times" and v == 1)}
                  for st in self.stages]
        return {"name": self.name, "budget": self.budget, "final_size": self.final_size, "stages": stages}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], multiple_of: int = DEFAULT_MULTIPLE_OF,
                  source: str = "curriculum") -> "Curriculum":
        """Build from a mapping (e.g. parsed YAML); unknown keys and bad values are errors."""
        if not isinstance(data, Mapping):
            raise CurriculumError(f"{source}: expected a mapping with keys name, budget, stages; got {type(data).__name__}")
        allowed = {"name", "budget", "final_size", "stages", "description"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise CurriculumError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise CurriculumError(f"{source}: 'stages' must be a non-empty list of mappings")
        stages = []
        for i, raw in enumerate(raw_stages):
            if not isinstance(raw, Mapping):
                raise CurriculumError(f"{source}, stage {i}: expected a mapping, got {raw!r}")
            bad = sorted(set(raw) - set(STAGE_KEYS))
            if bad:
                raise CurriculumError(f"{source}, stage {i}: unknown key(s) {bad}; allowed: {list(STAGE_KEYS)}")
            if "size" not in raw or "share" not in raw:
                raise CurriculumError(f"{source}, stage {i}: 'size' and 'share' are required")
            if isinstance(raw["size"], int) and raw["size"] % multiple_of:
                raise CurriculumError(
                    f"{source}, stage {i}: size {raw['size']} is not a multiple of {multiple_of} "
                    f"(sizes must be multiples of multiple_of, the patch size or 32 for ConvNets)")
            stages.append(Stage(**raw))
        cur = cls(name=str(data.get("name", source)), stages=tuple(stages),
                  budget=data.get("budget", "epochs"), description=str(data.get("description", "")))
        final = data.get("final_size")
        if final is not None and final != cur.final_size:
            raise CurriculumError(
                f"{source}: final_size {final} differs from the last stage's size {cur.final_size}")
        return cur

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], multiple_of: int = DEFAULT_MULTIPLE_OF) -> "Curriculum":
        import yaml

        with open(path, "r", encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise CurriculumError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, multiple_of=multiple_of, source=str(path))


# ---- built-in curricula ---------------------------------------------------------------------

def _linear_magnitude_stages(sizes: Sequence[int], shares: Sequence[float], max_m: float) -> Tuple[Stage, ...]:
    """Stages whose RandAug magnitude grows linearly with budget position, 0 -> max_m (ET, Sec. 4.3)."""
    out, acc = [], 0.0
    for size, share in zip(sizes, shares):
        out.append(Stage(size=size, share=share, magnitude=max_m * acc, magnitude_end=max_m * (acc + share)))
        acc += share
    return tuple(out)


def baseline(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """One stage at the final size with the full augmentation: the reference every speedup is against."""
    round_size(final_size, multiple_of, final_size)
    return Curriculum("baseline", (Stage(size=final_size, share=1.0, magnitude=max_magnitude),), "epochs",
                      "every sample at the final size")


def et(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """EfficientTrain (ICCV 2023, Table 5): B=160 for 60% of the epochs, 192 for 20%, 224 for 20%;
    RandAug m = 9 t/T. For gamma >= 224 the sizes are 160, (160+gamma)/2, gamma (Sec. 5.1); below
    224, where 160 would not fit, 160/192/224 are scaled by gamma/224."""
    if final_size >= 224:
        sizes = [160, (160 + final_size) / 2, final_size]
    else:
        sizes = [s * final_size / 224 for s in (160, 192, 224)]
    sizes = [round_size(s, multiple_of, final_size) for s in sizes]
    return Curriculum("et", _linear_magnitude_stages(sizes, (0.6, 0.2, 0.2), max_magnitude), "epochs",
                      "EfficientTrain (ICCV 2023) Table 5")


def _etpp_family(name: str, sizes_224: Sequence[int], final_size: int, multiple_of: int, description: str) -> Curriculum:
    n = len(sizes_224)
    sizes = [round_size(s * final_size / 224, multiple_of, final_size) for s in sizes_224]
    stages = tuple(Stage(size=s, share=1.0 / n, magnitude=float(k)) for k, s in enumerate(sizes))
    return Curriculum(name, stages, "compute", description)


def etpp(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """EfficientTrain++ (Swin / CSWin / ResNet-50 and MAE): 10 equal-compute sub-stages at
    96 x2, 160 x4, 224 x4 with RandAug m = 0..9."""
    return _etpp_family("etpp", [96] * 2 + [160] * 4 + [224] * 4, final_size, multiple_of,
                        "EfficientTrain++ official schedule (Swin/CSWin/ResNet-50)")


def etpp_replay(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF,
                max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """:func:`etpp` with the replay buffer of the official DeiT-S / ResNet-50 scripts: replay times
    4,4,2,2,2,2,1,1,1,1 with buffers of 1920 (96 px) and 256 (160 px) loader batches, for hosts
    whose CPUs cannot feed the accelerators in the cheap stages."""
    cur = with_replay(etpp(final_size, multiple_of, max_magnitude), [4, 4, 2, 2, 2, 2, 1, 1, 1, 1],
                      [1920, 1920, 256, 256, 256, 256, 1, 1, 1, 1])
    return replace(cur, name="etpp-replay", description="EfficientTrain++ with the official replay buffer")


def etpp_deit(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """EfficientTrain++ tailored for DeiT: 96 x2, 160 x4, 192 x2, 224 x2."""
    return _etpp_family("etpp-deit", [96] * 2 + [160] * 4 + [192] * 2 + [224] * 2, final_size, multiple_of,
                        "EfficientTrain++ official schedule for DeiT")


def etpp_deit_replay(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF,
                     max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """:func:`etpp_deit` with the replay buffer of the official DeiT-S script
    (_ET_pp_wReplay_main_deitS.py): replay times 4,4,2,2,2,2,1,1,1,1, buffers of 1920 (96 px) and
    256 (160 px) loader batches."""
    cur = with_replay(etpp_deit(final_size, multiple_of, max_magnitude), [4, 4, 2, 2, 2, 2, 1, 1, 1, 1],
                      [1920, 1920, 256, 256, 256, 256, 1, 1, 1, 1])
    return replace(cur, name="etpp-deit-replay", description="EfficientTrain++ for DeiT with the official replay buffer")


def etpp_convnext(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE) -> Curriculum:
    """EfficientTrain++ for ConvNeXt: 160 x6, 224 x4."""
    return _etpp_family("etpp-convnext", [160] * 6 + [224] * 4, final_size, multiple_of,
                        "EfficientTrain++ official schedule for ConvNeXt")


def linear(final_size: int = 224, multiple_of: int = DEFAULT_MULTIPLE_OF, max_magnitude: float = MAX_MAGNITUDE,
           num_stages: int = 10) -> Curriculum:
    """Input size growing linearly over ``num_stages`` equal-epoch stages up to the final size,
    with the same pixel cost as ``et`` (Table 13(c) baseline, progressive learning). The start
    size is the one whose rounded staircase comes closest to ``et``'s cost; RandAug as in ``et``."""
    target = et(final_size, multiple_of).compute(1.0)
    best: Optional[Tuple[float, List[int]]] = None
    steps = 4 * final_size
    for k in range(steps + 1):
        b0 = multiple_of + (final_size - multiple_of) * k / steps
        sizes = [round_size(b0 + (final_size - b0) * i / (num_stages - 1), multiple_of, final_size)
                 for i in range(num_stages)]
        err = abs(sum(s * s for s in sizes) / (num_stages * final_size ** 2) - target)
        if best is None or err < best[0] - 1e-12:
            best = (err, sizes)
    assert best is not None
    return Curriculum("linear", _linear_magnitude_stages(best[1], [1.0 / num_stages] * num_stages, max_magnitude),
                      "epochs", "linearly increasing input size at et's cost (Table 13(c))")


BUILTIN: Dict[str, Callable[..., Curriculum]] = {
    "baseline": baseline,
    "et": et,
    "etpp": etpp,
    "etpp-replay": etpp_replay,
    "etpp-deit": etpp_deit,
    "etpp-deit-replay": etpp_deit_replay,
    "etpp-convnext": etpp_convnext,
    "linear": linear,
}


def get_curriculum(name: Union[str, os.PathLike], final_size: int = 224,
                   multiple_of: int = DEFAULT_MULTIPLE_OF) -> Curriculum:
    """A built-in curriculum by name, or one read from a YAML file, adapted to ``final_size``."""
    text = os.fspath(name)
    if text in BUILTIN:
        return BUILTIN[text](final_size=final_size, multiple_of=multiple_of)
    if text.endswith((".yaml", ".yml")) or os.path.sep in text:
        if not os.path.isfile(text):
            raise CurriculumError(f"curriculum file {text!r} does not exist")
        cur = Curriculum.from_yaml(text, multiple_of=multiple_of)
        return cur if cur.final_size == final_size else cur.scaled(final_size, multiple_of)
    raise CurriculumError(
        f"unknown curriculum {text!r}; allowed: {', '.join(BUILTIN)} or a path to a .yaml file")


def with_replay(cur: Curriculum, replay_times: Sequence[int], buffer_batches: Union[int, Sequence[int]]) -> Curriculum:
    """The same curriculum with per-stage replay (e.g. 4,4,2,2,2,2,1,1,1,1 as the official ET++
    DeiT-S/ResNet-50 scripts); ``buffer_batches`` is the buffer size in loader batches."""
    if len(replay_times) != len(cur.stages):
        raise CurriculumError(f"replay_times has {len(replay_times)} entries; curriculum {cur.name!r} has {len(cur.stages)} stages")
    buffers = [buffer_batches] * len(cur.stages) if isinstance(buffer_batches, int) else list(buffer_batches)
    if len(buffers) != len(cur.stages):
        raise CurriculumError(f"buffer_batches has {len(buffers)} entries; curriculum has {len(cur.stages)} stages")
    stages = tuple(replace(st, replay_times=int(rt), replay_buffer=(int(b) if rt > 1 else None))
                   for st, rt, b in zip(cur.stages, replay_times, buffers))
    return replace(cur, stages=stages)


def with_stage_accumulation(cur: Curriculum, accum_steps: int, batch_size: int, world_size: int = 1,
                            replay_chunks: int = 1) -> Curriculum:
    """Fewer gradient-accumulation micro-steps where inputs are smaller: a stage of size ``s`` takes
    the fewest micro-steps ``a`` whose per-process micro-batch holds no more pixels than the final
    size's (``a >= accum_steps * (s / final)^2``: activation memory follows pixels), among those that
    split the stage's batch and loader batch evenly over ``world_size`` processes (and, in a replay
    stage, a loader micro-batch into ``replay_chunks`` chunks); ``accum_steps`` when
    none does. A larger micro-batch means fewer, larger kernels: the cheap stages' fixed per-step cost
    shrinks. The gradient of a step is the same mean over the same samples. Stages that set their own
    ``accum_steps`` keep it."""
    if accum_steps <= 1:
        return cur
    final = cur.final_size
    stages = []
    for st in cur.stages:
        if st.accum_steps is not None:
            stages.append(st)
            continue
        bs = st.batch_size or batch_size
        loader = bs // st.replay_times
        low = max(1, math.ceil(accum_steps * (st.size / final) ** 2 - 1e-9))
        chunks = replay_chunks if st.replay_times > 1 else 1
        fits = [a for a in range(low, accum_steps + 1)
                if bs % (a * world_size) == 0 and loader % (a * world_size * chunks) == 0]
        stages.append(replace(st, accum_steps=fits[0] if fits else accum_steps))
    return replace(cur, stages=tuple(stages))


def model_flops_cost(model: Any, in_chans: int = 3) -> CostFn:
    """A cost function counting the forward FLOPs of ``model`` on one image of size B x B (for
    ``speedup``/``compute`` budgets with the FLOPs cost model). The model must accept every size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cache: Dict[int, float] = {}

    def cost(size: int) -> float:
        if size not in cache:
            was_training = model.training
            model.eval()
            try:
                x = torch.zeros(1, in_chans, size, size)
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    model(x)
                cache[size] = float(counter.get_total_flops())
            finally:
                model.train(was_training)
        return cache[size]

    return cost
