"""Proxy runs for the curriculum searches: ``python -m evaluation.curriculum search PROXY.yaml``.

A proxy YAML (schema: :class:`ProxyConfig`) names a short training recipe (a pretraining or
supervised base config, overrides, a labelled ImageFolder root with ``train/`` and ``val/``, a
budget and a seed) and the search (``et``: EfficientTrain's Algorithm 1; ``etpp``: the
EfficientTrain++ compute-constrained search; :mod:`efficienttrain.search` documents both). Every
trial is one study arm (:mod:`evaluation.study`): a ``python -m pretrain`` (or ``python -m finetune
mode=train``) process in its own folder ``output/trials/<sizes>_<key>/seed<k>`` with the trial's
curriculum file beside it; a finished trial is read back, an interrupted one resumed. The metric
is the kNN top-1 of the pretrained encoder on ``val/`` with ``train/`` as the bank (pretrain), or
the run's final validation top-1 (supervised). Outputs in the output folder: ``curriculum.yaml``
(the schedule found, for ``curriculum.name=``), ``search.json`` and ``search.md`` (every trial),
``trials.json`` (the trial cache: rerunning the same command continues an interrupted search).

Relative paths are relative to the working directory (run it from the repository root).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import yaml

from efficienttrain.curriculum import Curriculum, CurriculumError
from efficienttrain.search import (ET_ORDERS, ETPP_STRATEGIES, SEARCHES, SearchResult, TrialCache, et_schedule,
                                   search_et, search_etpp, signature)
from engine.checkpoint import atomic_write_json
from engine.config import ConfigError, join_key, load_config
from engine.data import public_dataset_hint
from engine.errors import RunFailed

from .study import KINDS, ArmConfig, StudyConfig, StudyEvalConfig, arm_config, device_label, run_arm

# pretraining trials read data.path = <data>/train and are scored once at the end (kNN), so the
# base config's demo generation and in-run kNN monitor (both keyed to its own data.path) are off
PRETRAIN_FIXED = ["data.demo=false", "eval.knn.train=''", "eval.knn.val=''"]


@dataclass
class ProxyKNNConfig:
    k: int = 20                       # pretrain metric: neighbours that vote (weighted kNN, engine.knn)
    temperature: float = 0.07         # vote weight exp(similarity / temperature)
    feature: str = "cls"              # cls | avgpool
    batch_size: int = 256             # feature-extraction batch


@dataclass
class ProxyConfig:
    name: str = ""                    # names the curriculum found and the default output folder
    description: str = ""             # a sentence for the report
    kind: str = "pretrain"            # pretrain (MAE; metric: kNN top-1) | supervised (finetune mode=train; val top-1)
    config: str = ""                  # base training YAML of every trial
    overrides: List[str] = field(default_factory=list)   # key=value of the base config for every trial
    data: str = ""                    # ImageFolder root with train/ and val/
    demo: bool = False                # generate the bundled demo set at `data` if it is missing
    seed: int = 0                     # train.seed of every trial (one seed: trials differ by their schedule only)
    search: str = "etpp"              # et (EfficientTrain Algorithm 1) | etpp (EfficientTrain++ compute-constrained)
    budget: float = 0.0               # et: training epochs T; etpp: equivalent epochs E at the final size (fixed compute)
    stages: int = 0                   # et: N equal-epoch stages (paper: 5); etpp: K equal-compute sub-stages (official: 10)
    sizes: List[int] = field(default_factory=list)   # candidate input sizes; the largest is the final size (model.img_size)
    max_magnitude: float = 9.0        # RandAug magnitude at the end (et: linear in epochs; etpp: max * k / (K-1))
    tolerance: Optional[float] = None   # et: passes when accuracy >= a0 - tolerance (points; default 0)
    baseline_accuracy: Optional[float] = None   # et: a0 given instead of trained (default: the all-final-size trial)
    order: Optional[str] = None       # et: linear search down (default; from the next stage's size) | up (smallest first)
    strategy: Optional[str] = None    # etpp: greedy (default; one sub-stage at a time) | exhaustive (every schedule)
    knn: ProxyKNNConfig = field(default_factory=ProxyKNNConfig)   # pretrain metric settings
    output_dir: str = ""              # default: runs/search/<name>
    nproc: int = 1                    # processes per trial (> 1: torchrun --standalone on this node)

    def validate(self, where: str) -> None:
        def key(name: str) -> str:
            return join_key(where, name)

        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{key('name')} must be a non-empty folder-safe name (letters, digits, - _ .), "
                              f"got {self.name!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"{key('kind')}: {self.kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        if not self.config or not os.path.isfile(self.config):
            raise ConfigError(f"{key('config')}: {self.config!r} is not a file; give the base training YAML, "
                              "relative to the working directory")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{key('overrides')}: {bad} are not key=value")
        if not self.data:
            raise ConfigError(f"{key('data')} is required: an ImageFolder root with train/ and val/")
        if self.search not in SEARCHES:
            raise ConfigError(f"{key('search')}: {self.search!r} is not allowed; allowed: {', '.join(SEARCHES)}")
        if not self.budget > 0:
            raise ConfigError(f"{key('budget')} must be > 0 (et: training epochs; etpp: equivalent epochs at the "
                              f"final size), got {self.budget}")
        if self.stages < 2:
            raise ConfigError(f"{key('stages')} must be >= 2 (et: N equal-epoch stages, paper 5; etpp: K equal-compute "
                              f"sub-stages, official 10), got {self.stages}")
        if not self.sizes or any(s < 1 for s in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"{key('sizes')} must be a non-empty list of distinct positive input sizes (the largest is "
                              f"the final size, e.g. [32, 48, 64] for 64 px), got {self.sizes}")
        if self.max_magnitude < 0:
            raise ConfigError(f"{key('max_magnitude')} must be >= 0, got {self.max_magnitude}")
        only = {"tolerance": "et", "baseline_accuracy": "et", "order": "et", "strategy": "etpp"}
        for name, kind in only.items():
            if getattr(self, name) is not None and self.search != kind:
                raise ConfigError(f"{key(name)} applies to search: {kind} only; this proxy has search: {self.search}")
        if self.tolerance is not None and self.tolerance < 0:
            raise ConfigError(f"{key('tolerance')} must be >= 0 (accuracy points), got {self.tolerance}")
        if self.order is not None and self.order not in ET_ORDERS:
            raise ConfigError(f"{key('order')}: {self.order!r} is not allowed; allowed: {', '.join(ET_ORDERS)}")
        if self.strategy is not None and self.strategy not in ETPP_STRATEGIES:
            raise ConfigError(f"{key('strategy')}: {self.strategy!r} is not allowed; allowed: "
                              f"{', '.join(ETPP_STRATEGIES)}")
        if self.knn.feature not in ("cls", "avgpool") or self.knn.k < 1 or not self.knn.temperature > 0 \
                or self.knn.batch_size < 1:
            raise ConfigError(f"{key('knn')}: feature must be cls or avgpool, k and batch_size >= 1, temperature > 0; "
                              f"got {dataclasses.asdict(self.knn)}")
        if self.nproc < 1:
            raise ConfigError(f"{key('nproc')} must be >= 1, got {self.nproc}")

    def out(self) -> str:
        return self.output_dir or os.path.join("runs", "search", self.name)


def load_proxy(path: str, overrides: List[str] = ()) -> ProxyConfig:
    return load_config(ProxyConfig, path, list(overrides))


# ---- one trial: a study arm -------------------------------------------------------------------
class ProxyRunner:
    """Turns a curriculum into a proxy training run (a study arm) and its accuracy."""

    def __init__(self, proxy: ProxyConfig, log: Callable[[str], None] = print) -> None:
        self.proxy, self.log = proxy, log
        self.out = proxy.out()
        self.study = StudyConfig(
            name=proxy.name, kind=proxy.kind, config=proxy.config,
            overrides=[*(PRETRAIN_FIXED if proxy.kind == "pretrain" else []), *proxy.overrides],
            data=proxy.data, seeds=[proxy.seed], output_dir=os.path.join(self.out, "trials"), nproc=proxy.nproc,
            evaluation=StudyEvalConfig(knn=True, probe=False, k=proxy.knn.k, temperature=proxy.knn.temperature,
                                       feature=proxy.knn.feature, batch_size=proxy.knn.batch_size))
        self.training: Dict[str, Any] = {}     # what a trial's run depends on: its folder's key
        self.context: Dict[str, Any] = {}      # ... and the metric: the trial cache's key

    def check(self) -> None:
        """Before anything trains: the data folders, the training config with the proxy's overrides,
        and a curriculum holding every candidate size (multiples of the run's multiple_of), at
        the final size the config trains at. Sets the cache context (the resolved config)."""
        p = self.proxy
        if p.demo:
            from engine.demo_data import generate_demo_dataset

            generate_demo_dataset(p.data, reuse_any=True, key="data")   # keeps any set of ours; refuses other folders
        self._check_data()
        final = max(p.sizes)
        probe = et_schedule(sorted(p.sizes) + [final], p.max_magnitude, name=f"{p.name}-check")
        arm = self._arm(probe, "check")             # trials/check/curriculum.yaml: every size once
        try:
            cfg, _ = arm_config(self.study, arm, p.seed)
        except (ConfigError, CurriculumError) as e:
            raise ConfigError(f"proxy {p.name!r} (config {p.config}, overrides {p.overrides}, sizes {p.sizes}): {e}") from None
        if cfg.model.img_size != final:
            raise ConfigError(f"sizes: the largest candidate ({final}) must be the final size the training config "
                              f"trains at (model.img_size = {cfg.model.img_size}); set model.img_size={final} in "
                              "overrides or change sizes")
        resolved = dataclasses.asdict(cfg)
        resolved["curriculum"].pop("name", None)           # per trial
        resolved["train"].pop("output_dir", None)
        self.training = {"kind": p.kind, "config": resolved, "data": p.data, "nproc": p.nproc}
        self.context = {**self.training, "metric": dataclasses.asdict(p.knn) if p.kind == "pretrain" else "val_top1"}

    def _check_data(self) -> None:
        p = self.proxy
        for sub in ("train", "val"):
            if not os.path.isdir(os.path.join(p.data, sub)):
                raise ConfigError(f"data: {os.path.join(p.data, sub)!r} is not a folder; data must be an ImageFolder "
                                  "root with train/ and val/" + ("" if p.demo else " (demo: true generates the demo set)")
                                  + (public_dataset_hint(p.data) if not os.path.exists(p.data) else ""))

    def _arm(self, cur: Curriculum, name: str) -> ArmConfig:
        """The study arm of a trial: its curriculum file (written beside the run folder) and budget."""
        path = os.path.join(self.study.out(), name, "curriculum.yaml")
        write_curriculum(cur, path)
        return ArmConfig(name=name, overrides=[f"curriculum.name={path}", f"curriculum.epochs={self.proxy.budget!r}"])

    def __call__(self, cur: Curriculum) -> Dict[str, Any]:
        sizes = [st.size for st in cur.stages]
        # the folder is keyed by what trains, so changed kNN settings re-evaluate a finished run
        arm = self._arm(cur, f"{'-'.join(map(str, sizes))}_{signature(cur, self.training)[:8]}")
        try:
            rec = run_arm(self.study, arm, self.proxy.seed, self.log)
        except RunFailed as e:
            raise RunFailed(f"search trial {sizes}: {e}") from None
        metric = "knn" if self.proxy.kind == "pretrain" else "val"
        acc = (rec.get("eval", {}).get(metric) or {}).get("top1")
        if acc is None:
            raise RunFailed(f"search trial {sizes}: its run {rec['run_dir']} reported no {metric} top-1 "
                            "(a supervised trial needs its end-of-run validation)")
        return {"accuracy": float(acc), "run_dir": rec["run_dir"], "train_s": rec.get("wall_s"),
                "train_flops": rec.get("train_flops"), "equivalent_epochs": rec.get("equivalent_epochs"),
                "device": rec.get("device")}


def write_curriculum(cur: Curriculum, path: str, header: List[str] = ()) -> None:
    """``cur`` as a curriculum YAML (``Curriculum.from_yaml`` / ``curriculum.name=PATH``), written
    atomically; ``header`` lines become comments."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = cur.to_dict()
    if cur.description:
        data["description"] = cur.description
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"# {line}\n" for line in header)
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)


# ---- the search and its report ----------------------------------------------------------------
def run_search(proxy: ProxyConfig, command: str, log: Callable[[str], None] = print) -> SearchResult:
    """Check the proxy, run the search (finished trials read back from ``trials.json``), then write
    curriculum.yaml, search.json and search.md into the output folder."""
    runner = ProxyRunner(proxy, log)
    runner.check()
    out = runner.out
    os.makedirs(out, exist_ok=True)
    cache = TrialCache(os.path.join(out, "trials.json"))
    t0 = time.time()
    common = dict(max_magnitude=proxy.max_magnitude, cache=cache, context=runner.context, name=proxy.name, log=log)
    if proxy.search == "et":
        res = search_et(runner, proxy.sizes, proxy.stages, tolerance=proxy.tolerance or 0.0,
                        a0=proxy.baseline_accuracy, order=proxy.order or "down", **common)
    else:
        res = search_etpp(runner, proxy.sizes, proxy.stages, strategy=proxy.strategy or "greedy", **common)
    wall = time.time() - t0
    found = dataclasses.replace(res.curriculum, description=f"found by {command} ({describe(proxy)})")
    path = os.path.join(out, "curriculum.yaml")
    use = usage(proxy, path)
    write_curriculum(found, path, [f"Found by: {command}", f"Proxy: {describe(proxy)}",
                                   f"Proxy accuracy {res.accuracy:.2f}; report: {os.path.join(out, 'search.md')}",
                                   f"Use: {use}"])
    report = {**res.to_dict(), "proxy": dataclasses.asdict(proxy), "command": command, "usage": use,
              "device": device_label(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s_this_call": wall,
              "curriculum_file": path, "table": trial_rows(res, proxy)}
    atomic_write_json(report, os.path.join(out, "search.json"))
    write_markdown(report, os.path.join(out, "search.md"))
    log(f"[search] {res.kind}: {res.sizes} (proxy accuracy {res.accuracy:.2f}); {report['trials_run']} trial(s) "
        f"trained, {report['trials_cached']} read from the cache; wrote {path} and {os.path.join(out, 'search.md')}")
    return res


def describe(proxy: ProxyConfig) -> str:
    unit = "epochs" if proxy.search == "et" else "equivalent epochs"
    return (f"search {proxy.search}, {proxy.kind} {proxy.config}, data {proxy.data}, {proxy.budget:g} {unit}, "
            f"{proxy.stages} stages, sizes {sorted(proxy.sizes)}, seed {proxy.seed}")


def usage(proxy: ProxyConfig, path: str) -> str:
    tool = "tools/pretrain.sh" if proxy.kind == "pretrain" else "tools/finetune.sh"
    mode = "" if proxy.kind == "pretrain" else " mode=train"
    unit = "your epochs" if proxy.search == "et" else "your equivalent epochs E"
    return f"{tool} {proxy.config}{mode} curriculum.name={path} curriculum.epochs=<{unit}>"


def trial_rows(res: SearchResult, proxy: ProxyConfig) -> List[Dict[str, Any]]:
    """Per trial: schedule, planned compute (equivalent epochs at the final size) and saving,
    sample epochs, accuracy, wall time, cached or run."""
    rows = []
    for i, t in enumerate(res.trials):
        cur = t.curriculum
        rows.append({"trial": i + 1, "sizes": list(t.sizes), "compute": cur.compute(proxy.budget),
                     "sample_epochs": sum(cur.sample_epochs(proxy.budget)), "accuracy": t.accuracy,
                     "wall_s": t.wall_s, "train_s": t.info.get("train_s"), "status": "cached" if t.cached else "run",
                     "chosen": list(t.sizes) == res.sizes, "run_dir": t.info.get("run_dir")})
    return rows


def write_markdown(report: Dict[str, Any], path: str) -> None:
    p = report["proxy"]
    unit = "epochs" if p["search"] == "et" else "equivalent epochs at the final size"
    kind = ("EfficientTrain Algorithm 1 (ICCV 2023, Sec. 4.3)" if p["search"] == "et"
            else "EfficientTrain++ compute-constrained search")
    metric = "kNN top-1 %" if p["kind"] == "pretrain" else "val top-1 %"
    s = report["settings"]
    found = next(r for r in report["table"] if r["chosen"])
    cost = (f"planned compute {found['compute']:.2f} equivalent epochs at the final size, "
            f"{p['budget'] / found['compute']:.2f}x less than the all-final-size schedule"
            if p["search"] == "et" else f"{found['sample_epochs']:.2f} sample epochs in the fixed compute of "
                                        f"{p['budget']:g} equivalent epochs")
    lines = [f"# Curriculum search {p['name']}", "", (p["description"] or "").strip(), "",
             f"Command: `{report['command']}`  ", f"Device: {report['device']}  ", f"Date: {report['date']}  ",
             f"Search: {kind}, " + (f"order {s['order']}, tolerance {s['tolerance']:g}, threshold "
                                    f"{s['threshold']:.2f} (a0 {report['baseline_accuracy']:.2f}"
                                    f"{', given' if s['a0_given'] else ', the all-final-size trial'})"
                                    if p["search"] == "et" else f"strategy {s['strategy']}") + "  ",
             f"Proxy: {p['kind']} `{p['config']}` with {p['overrides']}, data `{p['data']}`, budget {p['budget']:g} "
             f"{unit}, {p['stages']} stages, candidate sizes {s['sizes']}, seed {p['seed']}  ",
             f"Found: **{report['sizes']}**, proxy {metric} {report['accuracy']:.2f} "
             f"({cost}; `{report['curriculum_file']}`)  ",
             f"Use it: `{report['usage']}`  ",
             f"Trials: {report['trials_run']} trained by this call, {report['trials_cached']} read from the cache; "
             f"this call took {report['wall_s_this_call'] / 60:.1f} min", "",
             f"| trial | sizes | compute (eq. epochs) | sample epochs | {metric} | wall s | train s | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["table"]:
        sizes = ", ".join(map(str, r["sizes"])) + (" **(found)**" if r["chosen"] else "")
        train = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['trial']} | {sizes} | {r['compute']:.2f} | {r['sample_epochs']:.2f} | {r['accuracy']:.2f} "
                     f"| {r['wall_s']:.0f} | {train} | {r['status']} |")
    lines += ["", "Decisions:", ""]
    for st in report["steps"]:
        if st["stage"] is None:
            lines.append(f"- every schedule ({st['schedules']}): best {st['chosen']}")
            continue
        tried = ", ".join(f"{t['size']}: {t['accuracy']:.2f}" + ("" if "passed" not in t else
                                                                ("" if t["passed"] else " (below)"))
                          for t in st["tried"])
        lines.append(f"- stage {st['stage']}: tried {tried} -> {st['chosen']}")
    lines += ["", "Compute is planned (pixel cost B^2, equivalent epochs at the final size); wall s is the whole "
              "trial (process start, training, evaluation) when it ran, train s its training steps. A cached trial "
              "shows the numbers of the call that ran it."]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main_search(proxy_path: str, overrides: List[str], output: Optional[str], command: str) -> None:
    """``python -m evaluation.curriculum search``: load the proxy (``--output`` replaces output_dir) and search."""
    proxy = load_proxy(proxy_path, list(overrides) + ([f"output_dir={output}"] if output else []))
    run_search(proxy, command)
