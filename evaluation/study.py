"""Study runner: train several arms (a curriculum, a budget, a seed) of one recipe, evaluate each,
and put them side by side: measured wall time and speedup, planned compute, accuracy.

A study YAML (schema: :class:`StudyConfig`) names a base training config, a labelled dataset
(ImageFolder root with ``train/`` and ``val/``), the arms (overrides of the base config; one is the
baseline) with their seeds, and the evaluations. Every (arm, seed) is one ``python -m pretrain``
(or ``python -m finetune mode=train`` for ``kind: supervised``) run in its own directory
``output_dir/<arm>/seed<k>``; a finished one is skipped, an interrupted one is resumed exactly
(the training runs resume on their own; changed evaluation settings re-evaluate finished arms).
The study writes ``study.json``, ``study.md`` and
``study.png`` (accuracy against wall time and against compute, one point per arm).

Relative paths in a study are relative to the working directory (run it from the repository root).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from engine.checkpoint import atomic_write_json
from engine.config import ConfigError, join_key, load_config
from engine.errors import RunFailed
from engine.images import public_dataset_hint
from engine.stops import RunDirBusy, RunLock, StopSignals, run_child

KINDS = ("pretrain", "supervised")


@dataclass
class ArmConfig:
    name: str = ""
    overrides: List[str] = field(default_factory=list)   # key=value of the base training config
    seeds: Optional[List[int]] = None                    # default: the study's seeds
    baseline: bool = False                               # the reference of the measured speedup
    equal_compute: str = ""                              # the arm of equal training FLOPs this one is compared
                                                         # with (report: its own table; plot: the pair joined)

    def validate(self, where: str) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{where}.name must be a non-empty folder-safe name (letters, digits, - _ .), "
                              f"got {self.name!r}")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{where}.overrides: {bad} are not key=value")


@dataclass
class StudyEvalConfig:
    knn: bool = True                  # pretrain: weighted kNN on frozen features (engine.knn)
    k: int = 20
    temperature: float = 0.07
    feature: str = "cls"
    probe: bool = True                # pretrain: linear probe on cached features (evaluation.probe)
    probe_epochs: int = 100
    finetune_epochs: float = 0        # pretrain: > 0 adds a short fine-tune (python -m finetune)
    finetune_config: str = ""         # fine-tuning YAML to start from (default: the finetune defaults)
    finetune_overrides: List[str] = field(default_factory=list)
    batch_size: int = 256
    num_workers: int = 0

    def validate(self, where: str) -> None:
        if self.feature not in ("cls", "avgpool"):
            raise ConfigError(f"{where}.feature: {self.feature!r} is not allowed; allowed: cls, avgpool")
        if self.k < 1 or self.probe_epochs < 1 or self.finetune_epochs < 0 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(f"{where}: k, probe_epochs and batch_size must be >= 1, finetune_epochs and "
                              "num_workers >= 0")
        if not self.temperature > 0:
            raise ConfigError(f"{where}.temperature must be > 0, got {self.temperature}")
        if self.finetune_config and not os.path.isfile(self.finetune_config):
            raise ConfigError(f"{where}.finetune_config: {self.finetune_config!r} is not a file")
        bad = [o for o in self.finetune_overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{where}.finetune_overrides: {bad} are not key=value")


@dataclass
class StudyConfig:
    name: str = ""
    description: str = ""
    kind: str = "pretrain"            # pretrain (MAE, python -m pretrain) | supervised (python -m finetune mode=train)
    config: str = ""                  # base training YAML of every arm
    overrides: List[str] = field(default_factory=list)   # key=value for every arm
    data: str = ""                    # ImageFolder root with train/ and val/
    seeds: List[int] = field(default_factory=lambda: [0])
    arms: List[ArmConfig] = field(default_factory=list)
    evaluation: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    output_dir: str = ""              # default: runs/study/<name>
    nproc: int = 1                    # processes per training run (> 1: torchrun --standalone on this node)

    def validate(self, where: str) -> None:
        if not self.name:
            raise ConfigError(f"{join_key(where, 'name')} is required (it names the output folder and the report)")
        if self.kind not in KINDS:
            raise ConfigError(f"{join_key(where, 'kind')}: {self.kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        if not self.config or not os.path.isfile(self.config):
            raise ConfigError(f"{join_key(where, 'config')}: {self.config!r} is not a file; give the base training YAML, "
                              "relative to the working directory")
        for sub in ("train", "val"):
            if not os.path.isdir(os.path.join(self.data, sub)):
                raise ConfigError(f"{join_key(where, 'data')}: {os.path.join(self.data, sub)!r} is not a folder; data must be an "
                                  "ImageFolder root with train/ and val/"
                                  + (public_dataset_hint(self.data) if not os.path.exists(self.data) else ""))
        classes = [sorted(e.name for e in os.scandir(os.path.join(self.data, sub)) if e.is_dir())
                   for sub in ("train", "val")]
        if classes[0] != classes[1] or not classes[0]:
            raise ConfigError(f"{join_key(where, 'data')}: train/ and val/ must have the same (non-empty) class folders; only in "
                              f"train: {sorted(set(classes[0]) - set(classes[1]))[:5]}, only in val: "
                              f"{sorted(set(classes[1]) - set(classes[0]))[:5]}")
        if not self.arms:
            raise ConfigError(f"{join_key(where, 'arms')}: give at least one arm (the one with baseline: true is the reference)")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{join_key(where, 'arms')}: duplicate arm names {dup}")
        if sum(a.baseline for a in self.arms) != 1:
            raise ConfigError(f"{join_key(where, 'arms')}: exactly one arm must have baseline: true (the reference of the "
                              f"measured speedup), got {sum(a.baseline for a in self.arms)}")
        for a in self.arms:
            if a.equal_compute and (a.equal_compute not in names or a.equal_compute == a.name):
                raise ConfigError(f"{join_key(where, 'arms')}: arm {a.name!r} equal_compute: {a.equal_compute!r} must name "
                                  f"another arm of the study ({', '.join(n for n in names if n != a.name)})")
        if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"{join_key(where, 'seeds')} must be a non-empty list of integers")
        if self.nproc < 1:
            raise ConfigError(f"{join_key(where, 'nproc')} must be >= 1, got {self.nproc}")

    def out(self) -> str:
        return self.output_dir or os.path.join("runs", "study", self.name)


def load_study(path: str) -> StudyConfig:
    return load_config(StudyConfig, path)


# ---- one arm ----------------------------------------------------------------------------------
def launcher(study: StudyConfig) -> List[str]:
    """How training processes start: this Python, or torchrun with ``nproc`` processes."""
    return [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(study.nproc)]
                               if study.nproc > 1 else [])


def arm_command(study: StudyConfig, arm: ArmConfig, seed: int, run_dir: str) -> List[str]:
    """The training command of (arm, seed): base config, study overrides, arm overrides, then the
    study's own keys (data, output folder, seed)."""
    common = [*study.overrides, *arm.overrides, f"train.output_dir={run_dir}", f"train.seed={seed}",
              "train.progress=false"]
    launch = launcher(study)
    if study.kind == "pretrain":
        return [*launch, "-m", "pretrain", "--config", study.config, *common,
                f"data.path={os.path.join(study.data, 'train')}"]
    return [*launch, "-m", "finetune", "--config", study.config, "mode=train", *common,
            f"data.path={study.data}", "data.train_dir=train", "data.val_dir=val"]


def arm_config(study: StudyConfig, arm: ArmConfig, seed: int) -> Tuple[Any, Any]:
    """An arm's resolved training config (base YAML + study and arm overrides, as its command
    gives them) and its curriculum; ConfigError / CurriculumError when either does not load."""
    from efficienttrain.curriculum import get_curriculum

    if study.kind == "pretrain":
        from pretrain.config import PretrainConfig as schema
    else:
        from finetune.config import FinetuneConfig as schema
    cmd = arm_command(study, arm, seed, os.path.join(study.out(), arm.name, f"seed{seed}"))
    cfg = load_config(schema, study.config, cmd[cmd.index("--config") + 2:])
    multiple = cfg.curriculum.multiple_of or getattr(cfg.model, "patch", None) or 32
    # a fine-tuning img_size left at null comes from the checkpoint when the run starts
    return cfg, get_curriculum(cfg.curriculum.name, cfg.model.img_size or 224, multiple)


def check_arms(study: StudyConfig) -> None:
    """Load every arm's training config (base YAML + study and arm overrides) and its curriculum
    before anything trains, so a typo in the last arm fails now, not hours into the study."""
    from efficienttrain.curriculum import CurriculumError

    for arm in study.arms:
        try:
            arm_config(study, arm, (arm.seeds or study.seeds)[0])
        except (ConfigError, CurriculumError) as e:
            raise ConfigError(f"arm {arm.name!r} (overrides {arm.overrides}): {e}") from None


def _flops_or_reason(run_dir: str, kind: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """:func:`training_flops`, or None figures and the reason: a finished run keeps its record (and
    the report its other columns) when its model cannot be counted."""
    from engine.flops import FlopsError

    try:
        return training_flops(run_dir, kind)
    except FlopsError as e:
        log(f"{run_dir}: training FLOPs not available ({e}); the report shows n/a")
        return {"train_flops": None, "equivalent_epochs": None, "flops_per_image": None, "flops_error": str(e)}


def training_flops(run_dir: str, kind: str) -> Dict[str, float]:
    """Planned training compute of a finished run: FLOPs (forward + backward per sample at every
    stage size, engine.flops.flops_per_sample on the run's model and loss, times the samples the
    plan's steps process) and equivalent epochs at the final size (the pixel cost the curricula
    are defined by)."""
    from engine.flops import flops_per_sample

    with open(os.path.join(run_dir, "plan.json")) as f:
        plan = json.load(f)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    if (cfg.get("growth") or {}).get("schedule", "none") != "none":
        from engine.flops import FlopsError

        raise FlopsError("a growth run trains sub-networks the plan's sizes do not describe; its planned block "
                         "compute is growth.planned_compute in the checkpoint meta and the run log")
    per_size = flops_per_sample(_model_for_flops(cfg, kind), [r["size"] for r in plan["rows"]])
    final = plan["rows"][-1]["size"]
    flops = sum(r["steps"] * r["batch_size"] * per_size[r["size"]] for r in plan["rows"])   # samples the steps ran
    eq = sum(r["sample_epochs"] * r["size"] ** 2 for r in plan["rows"]) / final ** 2
    return {"train_flops": flops, "equivalent_epochs": eq, "flops_per_image": {str(k): v for k, v in per_size.items()}}


def _model_for_flops(cfg: Dict[str, Any], kind: str):
    """The run's model and loss prepared per stage size (an engine.flops ``Build``), from its
    resolved config: the MAE with its mask ratio and target (pretrain.flops), or the classifier (finetune.flops)."""
    from engine.config import from_dict

    if kind == "pretrain":
        from pretrain.config import PretrainConfig
        from pretrain.flops import mae_builder

        c = from_dict(PretrainConfig, {**cfg, "data": {**cfg["data"], "path": cfg["data"]["path"] or "x"}})
        return mae_builder(c.model)
    from finetune.config import FinetuneConfig
    from finetune.flops import classifier_builder

    return classifier_builder(from_dict(FinetuneConfig, cfg).model)


def _config_hash(cmd: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(cmd[1:]).encode()).hexdigest()[:16]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _check_same_run(run_dir: str, what: Dict[str, str], arm: str) -> None:
    """Refuse to mix: the (arm, seed) folder must have been started by the same command and base
    config content (hashes in ``study_arm.json`` or, for an unfinished arm, ``study_started.json``)."""
    for name in ("study_arm.json", "study_started.json"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rec = json.load(f)
        for key, value in what.items():
            if key in rec and rec[key] != value:
                changed = "the base config file" if key == "base_config_hash" else "the study YAML"
                raise ConfigError(f"{run_dir} was run with another command ({changed} changed for arm {arm!r}); "
                                  "use another output_dir or remove that folder to rerun it")
        return


def run_arm(study: StudyConfig, arm: ArmConfig, seed: int, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train (or resume) one (arm, seed), evaluate it, and return its record; a finished one is
    read back, not rerun."""
    run_dir = os.path.join(study.out(), arm.name, f"seed{seed}")
    record_path = os.path.join(run_dir, "study_arm.json")
    cmd = arm_command(study, arm, seed, run_dir)
    key = _config_hash(cmd)
    eval_key = _eval_hash(study)
    hashes = {"command_hash": key, "base_config_hash": _file_hash(study.config)}
    _check_same_run(run_dir, hashes, arm.name)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if study.kind == "pretrain" and record.get("eval_hash", eval_key) != eval_key:
            log(f"[study] {arm.name} seed {seed}: finished earlier, evaluation settings changed: evaluating again")
            record.update(eval=_evaluate_pretrain(study, run_dir, launcher(study)), eval_hash=eval_key)
            atomic_write_json(record, record_path)
            return record
        log(f"[study] {arm.name} seed {seed}: finished earlier, skipped")
        return record
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(hashes, os.path.join(run_dir, "study_started.json"))
    resumed = os.path.isfile(os.path.join(run_dir, "checkpoints", "checkpoint-latest.pth"))
    log(f"[study] {arm.name} seed {seed}: {'resuming' if resumed else 'training'} ({' '.join(cmd[1:])}), "
        f"log {os.path.join(run_dir, 'train.log')}")
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as logf:
        rc = run_child(cmd, logf, f"arm {arm.name!r} seed {seed} (log {os.path.join(run_dir, 'train.log')})")
    if rc != 0:
        raise RunFailed(f"arm {arm.name!r} seed {seed} failed (exit {rc}); see {os.path.join(run_dir, 'train.log')}. "
                           "Running the same command again resumes it.")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    record: Dict[str, Any] = {"arm": arm.name, "seed": seed, "run_dir": run_dir, "command": cmd[1:],
                              **hashes, "eval_hash": eval_key, "baseline": arm.baseline, "device": device_label(),
                              # growth runs: growing and choosing at stage starts counts (and is shown apart);
                              # scoring candidates inside supernet phases is part of the steps already
                              "wall_s": summary["step_seconds"] + (summary.get("stage_start_seconds", 0.0)
                                                                   if summary.get("stage_starts_measured") else 0.0),
                              "stage_start_s": summary.get("stage_start_seconds", 0.0),
                              "search_s": (summary.get("growth") or {}).get("search_seconds"),
                              "overhead_s": summary["overhead_seconds"],
                              "planned_speedup": summary["planned_speedup"], "process_s_last": time.time() - t0,
                              **_flops_or_reason(run_dir, study.kind, log)}
    with open(os.path.join(run_dir, "plan.json")) as f:
        plan = json.load(f)
    record["curriculum"] = plan["curriculum"]["name"]
    record["budget_epochs"] = plan["budget_epochs"]
    if study.kind == "pretrain":
        record["eval"] = _evaluate_pretrain(study, run_dir, launcher(study))
    else:
        ev = summary.get("eval") or {}
        record["eval"] = {"val": {"top1": ev.get("eval_top1"), "top5": ev.get("eval_top5")}}
    atomic_write_json(record, record_path)
    return record


def _eval_hash(study: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(study.evaluation), sort_keys=True).encode()).hexdigest()[:16]


def read_record(study: StudyConfig, arm: ArmConfig, seed: int) -> Optional[Dict[str, Any]]:
    """A finished (arm, seed)'s record without running anything (``--only`` for the other arms);
    None when it has not finished. Records of another command or evaluation are refused."""
    run_dir = os.path.join(study.out(), arm.name, f"seed{seed}")
    path = os.path.join(run_dir, "study_arm.json")
    if not os.path.isfile(path):
        return None
    cmd = arm_command(study, arm, seed, run_dir)
    _check_same_run(run_dir, {"command_hash": _config_hash(cmd), "base_config_hash": _file_hash(study.config)},
                    arm.name)
    with open(path) as f:
        record = json.load(f)
    if study.kind == "pretrain" and record.get("eval_hash", _eval_hash(study)) != _eval_hash(study):
        raise ConfigError(f"{run_dir} was evaluated with other settings; run the study without --only "
                          f"{arm.name} to evaluate it again")
    return record


def _evaluate_pretrain(study: StudyConfig, run_dir: str, launch: Sequence[str]) -> Dict[str, Any]:
    from .run_eval import evaluate_run

    e = study.evaluation
    res = evaluate_run(run_dir, study.data, e.knn, e.probe, e.finetune_epochs, e.finetune_overrides,
                       e.finetune_config or None, e.k, e.temperature, e.feature, e.batch_size, e.num_workers,
                       e.probe_epochs, launcher=launch)
    wanted = [k for k, on in (("knn", e.knn), ("probe", e.probe), ("finetune", e.finetune_epochs > 0)) if on]
    return {k: res[k] for k in wanted}


# ---- the report -------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> Dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def compare(arm: Dict[str, Any], base: Dict[str, Any]) -> str:
    """How an arm's accuracy stands against the baseline's: a difference smaller than twice its
    standard error or than the seeds' spread (standard deviation; a single-seed arm borrows the
    other arm's) is reported as within noise, never as a win."""
    if arm["mean"] is None or base["mean"] is None:
        return "n/a"
    d = arm["mean"] - base["mean"]
    if arm["sd"] is None and base["sd"] is None:
        return f"{d:+.2f} (single seed: spread unknown)"
    sd_a, sd_b = arm["sd"] if arm["sd"] is not None else base["sd"], base["sd"] if base["sd"] is not None else arm["sd"]
    se = math.sqrt(sd_a ** 2 / arm["n"] + sd_b ** 2 / base["n"])
    spread = max(sd_a, sd_b)
    if abs(d) < max(2 * se, spread):
        return f"{d:+.2f} (within noise: |diff| < max(2 x SE {se:.2f}, seed spread {spread:.2f}))"
    return f"{d:+.2f} ({'better' if d > 0 else 'worse'}: |diff| > 2 x SE {se:.2f} and > seed spread {spread:.2f})"


def compare_arms(arm: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, str]:
    """:func:`compare` for every metric both summarized arms have."""
    return {m: compare(v, ref["accuracy"][m]) for m, v in arm["accuracy"].items() if m in ref["accuracy"]}


METRICS = {"pretrain": ("knn", "probe", "finetune"), "supervised": ("val",)}


def summarize(study: StudyConfig, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    arms = []
    for arm in study.arms:
        rs = [r for r in records if r["arm"] == arm.name]
        entry = {"arm": arm.name, "baseline": arm.baseline, "seeds": [r["seed"] for r in rs],
                 "curriculum": rs[0]["curriculum"], "budget_epochs": rs[0]["budget_epochs"],
                 "planned_speedup": rs[0]["planned_speedup"], "equivalent_epochs": rs[0]["equivalent_epochs"],
                 "train_flops": rs[0]["train_flops"], "wall_s": mean_sd([r["wall_s"] for r in rs]),
                 "stage_start_s": mean_sd([r.get("stage_start_s") or 0.0 for r in rs]),
                 "search_s": mean_sd([r.get("search_s") or 0.0 for r in rs]),
                 "overrides": arm.overrides, "accuracy": {}}
        for m in METRICS[study.kind]:
            vals = [(r["eval"].get(m) or {}).get("top1") for r in rs]
            if any(v is not None for v in vals):
                entry["accuracy"][m] = mean_sd(vals)
        arms.append(entry)
    base = next(a for a in arms if a["baseline"])
    for a in arms:
        a["measured_speedup"] = base["wall_s"]["mean"] / a["wall_s"]["mean"]
        a["flops_saving"] = (base["train_flops"] / a["train_flops"]
                             if base["train_flops"] and a["train_flops"] else None)
        a["vs_baseline"] = compare_arms(a, base)
    return {"name": study.name, "description": study.description, "kind": study.kind, "config": study.config,
            "data": study.data, "device": ", ".join(sorted({r.get("device") or device_label() for r in records})),
            "arms": arms, "equal_compute": equal_compute_pairs(study, arms), "runs": records}


def equal_compute_pairs(study: StudyConfig, arms: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every arm with ``equal_compute`` against that arm: their training FLOPs and wall-time ratios
    (the pair is only a fair one when the FLOPs ratio is near 1) and the accuracy differences, with
    the same noise rule as against the baseline."""
    by_name = {a["arm"]: a for a in arms}
    pairs = []
    for arm in study.arms:
        if not arm.equal_compute:
            continue
        a, p = by_name[arm.name], by_name[arm.equal_compute]
        pairs.append({"arm": a["arm"], "equal_compute": p["arm"],
                      "flops_ratio": a["train_flops"] / p["train_flops"] if a["train_flops"] and p["train_flops"]
                      else None,
                      "wall_ratio": a["wall_s"]["mean"] / p["wall_s"]["mean"],
                      "difference": {m: v["mean"] - p["accuracy"][m]["mean"] for m, v in a["accuracy"].items()
                                     if m in p["accuracy"] and None not in (v["mean"], p["accuracy"][m]["mean"])},
                      "vs_equal_compute": compare_arms(a, p)})
    return pairs


def device_label() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _fmt(ms: Dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if ms["mean"] is None:
        return "-"
    text = f"{ms['mean'] * scale:.{digits}f}"
    return text + (f" +- {ms['sd'] * scale:.{digits}f}" if ms["sd"] is not None else "")


def _num(x: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _si(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def write_report(report: Dict[str, Any], out: str, command: str) -> None:
    """study.json, study.md (the table) and study.png (accuracy vs wall time and vs compute)."""
    atomic_write_json({**report, "command": command}, os.path.join(out, "study.json"))
    metrics = [m for m in METRICS[report["kind"]] if any(m in a["accuracy"] for a in report["arms"])]
    head = ["arm", "curriculum", "budget (eq. epochs)", "train FLOP", "planned speedup (pixel)", "FLOPs saving",
            "wall min (steps)", "measured speedup", *[f"{m} top-1 %" for m in metrics], "seeds"]
    lines = [f"# Study {report['name']}", "", report["description"].strip(), "",
             f"Command: `{command}`  ", f"Device: {report['device']}  ", f"Base config: `{report['config']}`, data "
             f"`{report['data']}`", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in report["arms"]:
        row = [a["arm"] + (" (baseline)" if a["baseline"] else ""), a["curriculum"],
               f"{a['budget_epochs']:g} ({_num(a['equivalent_epochs'], '.1f')})", _si(a["train_flops"]),
               f"{a['planned_speedup']:.2f}x", _num(a["flops_saving"], ".2f", "x"), _fmt(a["wall_s"], 1 / 60),
               f"{a['measured_speedup']:.2f}x",
               *[_fmt(a["accuracy"][m]) if m in a["accuracy"] else "-" for m in metrics],
               ", ".join(map(str, a["seeds"]))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Against the baseline (difference of the mean top-1; a difference smaller than twice its "
              "standard error or than the seeds' standard deviation is reported as within noise):", ""]
    for a in report["arms"]:
        if not a["baseline"]:
            lines.append(f"- {a['arm']}: " + "; ".join(f"{m} {v}" for m, v in a["vs_baseline"].items()))
    if report.get("equal_compute"):
        lines += ["", "At equal compute (each arm against the arm of the same training FLOPs; the pair is fair "
                  "when the FLOPs ratio is near 1.00):", "",
                  "| arm | equal-compute arm | FLOPs ratio | wall-time ratio | "
                  + " | ".join(f"{m} difference" for m in metrics) + " |", "|" + " --- |" * (4 + len(metrics))]
        for p in report["equal_compute"]:
            lines.append(f"| {p['arm']} | {p['equal_compute']} | {_num(p['flops_ratio'], '.3f')} | "
                         f"{p['wall_ratio']:.2f} | " + " | ".join(p["vs_equal_compute"].get(m, "-") for m in metrics) + " |")
    lines += ["", "Wall time is the arms' training steps (data loading included; checkpoints, pictures and "
              "monitor evaluations excluded), summed over resumed processes. The planned speedup is in the pixel "
              "cost (B^2) the curricula are planned with; the FLOPs saving is the baseline arm's training FLOPs "
              "over the arm's, forward + backward per sample counted on the arm's model at every stage size "
              "(engine.flops), times the samples the plan's steps process."
              + (" Growth arms (growth.schedule): the planned speedup is the sub-networks' block FLOPs "
                 "(engine/progressive.py), and their training FLOPs are not counted (n/a). Their wall time "
                 "includes growing and choosing at stage starts and scoring candidates in supernet phases: "
                 + "; ".join(f"{a['arm']} {a['stage_start_s']['mean']:.1f} s + {a['search_s']['mean']:.1f} s"
                             for a in report["arms"] if a["curriculum"] in ("prog", "autoprog")) + "."
                 if any(a["curriculum"] in ("prog", "autoprog") for a in report["arms"]) else "")]
    md = os.path.join(out, "study.md")
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    _plot(report, metrics, os.path.join(out, "study.png"))


def _plot(report: Dict[str, Any], metrics: List[str], path: str) -> None:
    """One row per metric: top-1 (mean, error bar one seed sd) against training wall time (with its
    sd) and against training FLOPs; each arm one colour, equal-compute pairs joined by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(metrics), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.4 * rows), dpi=110, squeeze=False)
    colours = {a["arm"]: f"C{i % 10}" for i, a in enumerate(report["arms"])}
    by_name = {a["arm"]: a for a in report["arms"]}
    xs = (("wall time of training, minutes", lambda a: (a["wall_s"]["mean"] / 60, (a["wall_s"]["sd"] or 0) / 60)),
          ("training compute, TFLOP (forward + backward)",
           lambda a: (a["train_flops"] / 1e12, 0.0) if a["train_flops"] else (None, 0.0)))
    for row, m in enumerate(metrics):
        for col, (xlabel, xof) in enumerate(xs):
            ax = axes[row][col]
            for a in report["arms"]:
                acc = a["accuracy"].get(m)
                x, xerr = xof(a)
                if acc is None or acc["mean"] is None or x is None:
                    continue
                ax.errorbar(x, acc["mean"], yerr=acc["sd"] or 0, xerr=xerr or None, marker="o", capsize=3,
                            color=colours[a["arm"]], label=f"{a['arm']} (n={acc['n']})")
                ax.annotate(a["arm"], (x, acc["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            for p in report.get("equal_compute", []):
                a, b = by_name[p["arm"]], by_name[p["equal_compute"]]
                pts = [(xof(r)[0], (r["accuracy"].get(m) or {}).get("mean")) for r in (a, b)]
                if all(x is not None and y is not None for x, y in pts):
                    ax.plot(*zip(*pts), ls="--", lw=1, color=colours[a["arm"]])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{m} top-1 %")
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="best")
    fig.suptitle(f"study {report['name']}" + (": dashed lines join equal-compute pairs"
                                              if report.get("equal_compute") else ""))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def run_study(study: StudyConfig, command: str, log: Callable[[str], None] = print,
              only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run every (arm, seed) in order (finished ones are read back), then write the report. Each
    (arm, seed) is locked (``study.lock`` in its folder) while this process runs it, so several
    processes can share one study (``--only ARM`` or ``seeds=[K]``, e.g. one per node): an (arm,
    seed) another live process holds is skipped here, and the report waits for it. A signal stops
    the arm in training cleanly (it saves its step) and the study with it, so the same command
    continues where it stopped."""
    unknown = sorted(set(only or []) - {a.name for a in study.arms})
    if unknown:
        raise ConfigError(f"--only: unknown arm(s) {unknown}; the study has {[a.name for a in study.arms]}")
    check_arms(study)
    signals = StopSignals().install()       # between the arms' runs: stop at once, no traceback
    try:
        return _run_arms(study, command, log, only)
    finally:
        signals.restore()


STUDY_LOCK = "study.lock"        # beside the run's own run.lock, which its training child takes


def _run_locked(study: StudyConfig, arm: ArmConfig, seed: int, command: str,
                log: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """:func:`run_arm` under the (arm, seed)'s study lock; None when another live process holds it."""
    run_dir = os.path.join(study.out(), arm.name, f"seed{seed}")
    try:
        lock = RunLock(run_dir, command, name=STUDY_LOCK).acquire()
    except RunDirBusy:
        log(f"[study] {arm.name} seed {seed}: in use by {RunLock.holder(run_dir, STUDY_LOCK) or 'another process'}; "
            "skipped here")
        return None
    try:
        if lock.notice:
            log(f"[study] {arm.name} seed {seed}: {lock.notice}")
        return run_arm(study, arm, seed, log)
    finally:
        lock.release()


def _run_arms(study: StudyConfig, command: str, log: Callable[[str], None],
              only: Optional[Sequence[str]]) -> Dict[str, Any]:
    records = []
    for arm in study.arms:
        for seed in arm.seeds or study.seeds:
            rec = (read_record(study, arm, seed) if only and arm.name not in only
                   else _run_locked(study, arm, seed, command, log))
            if rec is not None:
                records.append(rec)
    missing = [f"{a.name} seed {s}" for a in study.arms for s in (a.seeds or study.seeds)
               if not any(r["arm"] == a.name and r["seed"] == s for r in records)]
    if missing:
        log(f"[study] not finished yet: {', '.join(missing)}; no report yet")
        return {"records": records}
    report = summarize(study, records)
    try:
        with RunLock(study.out(), command):     # two processes finishing together: one writes the report
            write_report(report, study.out(), command)
    except RunDirBusy:
        log(f"[study] another process is writing the report in {study.out()} now")
        return report
    log(f"[study] report: {os.path.join(study.out(), 'study.md')}")
    return report
