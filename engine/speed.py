"""Measured wall-time saving of a run: what the curriculum really bought, next to what it planned.

The trainer times every stage (its steps, data waits included; checkpoints, pictures and
evaluations are timed apart as overhead). The baseline a curriculum is compared with trains
``baseline_epochs`` epochs at the final size, so its time is estimated from the throughput this
run measured in its final-size stages: ``baseline_epochs * dataset_size / final-size images/s``.
The measured saving is that estimate over this run's step time; its ratio to the planned
(compute) saving says how much of the plan the hardware delivered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class StageTiming:
    """Wall time and samples of one stage (accumulated over resumed processes)."""

    size: int
    seconds: float = 0.0
    images: int = 0          # samples through the model (replayed ones included)
    steps: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class RunTiming:
    stages: Dict[int, StageTiming] = field(default_factory=dict)
    overhead_seconds: float = 0.0   # checkpoints, pictures, evaluations
    stage_start_seconds: float = 0.0   # stage starts: per-size preparation; with growth, growing, Eq. 8's search
                                       # and the continuity checks (part of a growth run's measured time)

    @property
    def total_seconds(self) -> float:
        """Wall time of the run so far: its steps, stage starts, checkpoints, pictures and evaluations."""
        return sum(t.seconds for t in self.stages.values()) + self.overhead_seconds + self.stage_start_seconds

    def state_dict(self) -> Dict[str, Any]:
        return {"stages": {str(k): vars(v).copy() for k, v in self.stages.items()},
                "overhead_seconds": self.overhead_seconds, "stage_start_seconds": self.stage_start_seconds}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        self.stages = {int(k): StageTiming(**v) for k, v in state["stages"].items()}
        self.overhead_seconds = float(state["overhead_seconds"])
        self.stage_start_seconds = float(state.get("stage_start_seconds", 0.0))   # older checkpoints: not timed


def wall_efficiency(ips: Dict[int, float], final_size: int, flops_ratio: Dict[str, float]) -> Dict[str, float]:
    """Per input size, how much of its FLOP saving a stage turned into time: (images/s at the size /
    images/s at the final size) / (FLOPs per image at the final size / at the size). 1.0: a stage
    with a quarter of the FLOPs runs four times the images per second; below it, fixed per-step
    costs (launches, the host, data) eat the saving. Sizes without a FLOP count are left out."""
    if final_size not in ips or not ips[final_size] > 0:
        return {}
    return {str(size): (v / ips[final_size]) * flops_ratio[str(size)]
            for size, v in sorted(ips.items()) if str(size) in flops_ratio and v > 0}


def measured_saving(timing: RunTiming, final_size: int, dataset_size: int, baseline_epochs: float,
                    planned_speedup: float, flops_ratio: Optional[Dict[str, float]] = None,
                    count_stage_starts: bool = False) -> Dict[str, Any]:
    """Summary dict: per-stage images/s, step, stage-start and overhead seconds, the estimated
    baseline time, the measured saving (None when no final-size step ran, e.g. a run stopped early)
    and, given the model's FLOPs per size relative to the final size, the wall efficiency per size.
    ``count_stage_starts`` (growth runs): the measured time is the steps plus the stage starts, as
    growing and AutoProg's search are part of what the method costs (reported apart too)."""
    rows: List[Dict[str, Any]] = [
        {"stage": k, "size": t.size, "steps": t.steps, "images": t.images, "seconds": t.seconds,
         "images_per_s": t.images_per_s} for k, t in sorted(timing.stages.items())]
    step_seconds = sum(t.seconds for t in timing.stages.values())
    final = [t for t in timing.stages.values() if t.size == final_size and t.seconds > 0]
    out: Dict[str, Any] = {"stages": rows, "step_seconds": step_seconds,
                           "overhead_seconds": timing.overhead_seconds,
                           "stage_start_seconds": timing.stage_start_seconds,
                           "stage_starts_measured": count_stage_starts,
                           "planned_speedup": planned_speedup, "baseline_epochs": baseline_epochs,
                           "final_size_images_per_s": None, "baseline_seconds_estimate": None,
                           "measured_speedup": None, "measured_over_planned": None}
    out["wall_efficiency"] = wall_efficiency(throughput_by_size(rows), final_size, flops_ratio or {})
    if final and step_seconds > 0:
        ips = sum(t.images for t in final) / sum(t.seconds for t in final)
        base = baseline_epochs * dataset_size / ips
        run = step_seconds + (timing.stage_start_seconds if count_stage_starts else 0.0)
        out.update(final_size_images_per_s=ips, baseline_seconds_estimate=base,
                   measured_speedup=base / run, measured_over_planned=base / run / planned_speedup)
    return out


def throughput_by_size(rows: List[Dict[str, Any]]) -> Dict[int, float]:
    """Images per second at each input size over the summary's stage rows (stages of one size pooled)."""
    by_size: Dict[int, List[float]] = {}
    for r in rows:
        if r["seconds"] > 0:
            acc = by_size.setdefault(r["size"], [0.0, 0.0])
            acc[0] += r["images"]
            acc[1] += r["seconds"]
    return {size: n / sec for size, (n, sec) in by_size.items()}


def times(ratio: float, what: str) -> str:
    """A saving ``ratio`` (baseline over this run) worded the right way round: ``2.50x less
    compute`` at 2.5, ``1.10x more wall time`` at 0.91 (a run slower than its baseline), ``the
    same wall time (1.00x)`` within rounding of 1."""
    if not ratio > 0:
        return f"{ratio:.2f}x {what} (not measurable)"
    if abs(ratio - 1.0) < 0.005:
        return f"the same {what} (1.00x)"
    return f"{ratio:.2f}x less {what}" if ratio > 1.0 else f"{1.0 / ratio:.2f}x more {what}"


def nothing_planned(planned_speedup: Optional[float]) -> bool:
    """True for a run that plans no saving (the baseline's own budget): 1.00x within rounding."""
    return planned_speedup is None or abs(planned_speedup - 1.0) < 0.005


def format_saving(summary: Dict[str, Any]) -> str:
    """The lines a run prints at its end: the throughput per size, the wall efficiency (runs with
    more than one size) and the planned against the measured saving, each worded the right way
    round (:func:`times`). A run without a curriculum that plans no saving (one input size,
    :func:`nothing_planned`) prints the throughput only; a curriculum at the baseline's compute
    still says what it measured against the baseline."""
    lines = ["throughput: " + ", ".join(f"{size}px {ips:.0f} img/s"
                                        for size, ips in throughput_by_size(summary["stages"]).items())
             + " (per stage in summary.json)"]
    eff = summary.get("wall_efficiency") or {}
    if len(eff) > 1:
        lines.append("wall efficiency (images/s relative to the final size x FLOPs per image relative to it; 1.00: "
                     "the FLOP saving fully in time): " + ", ".join(f"{size}px {e:.2f}" for size, e in eff.items()))
    planned = summary["planned_speedup"]
    if nothing_planned(planned) and len(throughput_by_size(summary["stages"])) <= 1:
        return "\n".join(lines)
    if summary["measured_speedup"] is None:
        lines.append(f"saving: planned {times(planned, 'compute')}; measured: not available "
                     "(no final-size stage ran in this run)")
    else:
        lines.append(
            "saving: planned " + (f"the same compute as {summary['baseline_epochs']:g}" if nothing_planned(planned)
                                  else f"{times(planned, 'compute')} than {summary['baseline_epochs']:g}")
            + f" epochs at the final size; measured {times(summary['measured_speedup'], 'wall time')}"
            + ("" if nothing_planned(planned) else " ")
            + ("" if nothing_planned(planned) else f"({summary['measured_over_planned']:.0%} of planned)")
            + f": {summary['step_seconds']:.1f} s of steps"
            + (f" + {summary['stage_start_seconds']:.1f} s of growth and search at stage starts"
               if summary.get("stage_starts_measured") else "") + " vs "
            f"{summary['baseline_seconds_estimate']:.1f} s for the baseline at this run's final-size "
            f"{summary['final_size_images_per_s']:.0f} img/s (+{summary['overhead_seconds']:.1f} s checkpoints, "
            "pictures, evaluation)")
    return "\n".join(lines)
