"""Curriculum searches: EfficientTrain's greedy search (ICCV 2023, Sec. 4.3, Algorithm 1) and
EfficientTrain++'s computationally constrained search, as pure procedures over an
``evaluate(curriculum) -> accuracy`` callable (higher is better).

Nothing here knows how a curriculum is trained: ``evaluate`` is a short proxy training run
(``evaluation.search_runner``) or, in tests, a synthetic function. Every evaluation goes through a
:class:`TrialCache` (a JSON file, rewritten atomically after every trial) keyed by a canonical
signature of the curriculum plus a caller-given ``context`` (the proxy: model, data, budget,
seed), so a second search, or one that was interrupted, never trains a finished trial again.

The two searches, and the choices the papers leave open:

:func:`search_et` (Algorithm 1). N equal-epoch stages, RandAug magnitude linear in the epoch
(m = m0 t / T, Sec. 4.3), all stages start at the final size F. For i = N-1 .. 1 (1-based) the
sizes of stages 1..i are set to one common B and B is minimised subject to
``accuracy >= a0 - tolerance``; the last stage stays at F.

- a0 is the accuracy of the all-F schedule *with the same magnitude ramp* (trained once, the first
  trial), so the only thing that varies between trials is B; a user who wants a different
  reference (e.g. the standard recipe, m = 9 throughout) gives ``a0`` instead.
- "Not below a0" with noise: a trial passes when ``accuracy >= a0 - tolerance``. ``tolerance``
  (accuracy points, default 0: the paper's strict rule) should be about the seed-to-seed spread
  of the proxy, or the search stops at the first unlucky trial.
- Candidate sizes are the caller's list (the paper's linear search over 224, 192, 160, 128 is
  steps of F/7); a stage's size never exceeds the next stage's (the curriculum is easier to
  harder, and Algorithm 1's later stages are fixed when an earlier one is chosen).
- Linear search direction ``order``: ``down`` (default) starts at the next stage's size (known to
  pass: it is the schedule accepted in the previous step) and goes down until the first failure;
  the answer is the last size that passed. With four candidates and N = 5 this trains 7 models
  when the answer is Table 5's 160,160,160,192,224 (the baseline and 2+2+1+1), the count the paper
  reports, which is why it is the default. It assumes accuracy does not rise again below a failing
  size. ``up`` tries the sizes from the smallest up and takes the first that passes: the exact
  minimum without that assumption, usually at more trials.
- If no candidate passes (only possible with a given ``a0`` above the baseline), the stage keeps
  the next stage's size.

:func:`search_etpp` (EfficientTrain++). A fixed compute budget (E equivalent epochs at the final
size) split into K sub-stages of equal compute (``budget: compute``, share 1/K each: a sub-stage
at size B runs (F/B)^2 times the epochs of one at F), RandAug magnitude m_k = m0 k / (K-1) in
sub-stage k (the official 0, 1, ..., 9 for K = 10). Every schedule costs the same, so the search
maximises the proxy accuracy over the schedules that are non-decreasing in size and end at F.

- ``strategy: greedy`` (default) fixes one sub-stage at a time from the first: sub-stage k tries
  every candidate from the size of sub-stage k-1 up to F, with the sub-stages after it at F, and
  keeps the most accurate; once a sub-stage takes F the rest are F too. The schedule with every
  sub-stage at F (the baseline at the same compute) is the first trial. At most
  1 + (K-1)(c-1) trials for c candidates, typically far fewer. Forward, not backward: with later
  sub-stages at F each step asks how cheap this part of training may be and still help, the
  question a compute budget poses; filling the earlier sub-stages with one B (Algorithm 1's move)
  would pick one average size and could never step up from a smaller one later.
- ``strategy: exhaustive`` trains every non-decreasing schedule ending at F:
  C(K-2+c, c-1) trials (55 for K = 10 and three sizes); the reference the greedy one is checked
  against, affordable for small K.
- Ties (equal accuracy) go to the schedule with fewer sample epochs, i.e. the larger size: less
  data loading and fewer optimizer steps for the same compute.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .curriculum import MAX_MAGNITUDE, Curriculum, CurriculumError, Stage, _linear_magnitude_stages

Evaluate = Callable[[Curriculum], Union[float, Mapping[str, Any]]]
"""Trains/evaluates one curriculum: its accuracy, or a mapping with ``accuracy`` and extra
JSON-able fields that are kept in the trial record (a run folder, training seconds, ...)."""

SEARCHES = ("et", "etpp")
ET_ORDERS = ("down", "up")
ETPP_STRATEGIES = ("greedy", "exhaustive")
CACHE_VERSION = 1


class SearchError(CurriculumError):
    """A search that cannot run as asked (bad sizes, stages, cache file); a user error."""


# ---- the schedules searched -------------------------------------------------------------------
def et_schedule(sizes: Sequence[int], max_magnitude: float = MAX_MAGNITUDE, name: str = "search-et") -> Curriculum:
    """Algorithm 1's schedule: one equal-epoch stage per entry of ``sizes``, RandAug magnitude
    linear in the epoch from 0 to ``max_magnitude`` (as ``et``)."""
    n = len(sizes)
    return Curriculum(name, _linear_magnitude_stages([int(s) for s in sizes], [1.0 / n] * n, max_magnitude), "epochs",
                      "EfficientTrain Algorithm 1 schedule")


def etpp_schedule(sizes: Sequence[int], max_magnitude: float = MAX_MAGNITUDE, name: str = "search-etpp") -> Curriculum:
    """EfficientTrain++'s schedule: one equal-compute sub-stage per entry of ``sizes``, magnitude
    ``max_magnitude * k / (K - 1)`` in sub-stage k (0, 1, ..., 9 for K = 10, as ``etpp``)."""
    k = len(sizes)
    stages = tuple(Stage(size=int(s), share=1.0 / k, magnitude=max_magnitude * i / max(k - 1, 1))
                   for i, s in enumerate(sizes))
    return Curriculum(name, stages, "compute", "EfficientTrain++ compute-constrained schedule")


def signature(cur: Curriculum, context: Optional[Mapping[str, Any]] = None) -> str:
    """Canonical key of a trial: what trains (budget mode and every stage field) plus ``context``
    (the proxy); the curriculum's name and description do not count."""
    payload = {"budget": cur.budget, "stages": [asdict(st) for st in cur.stages], "context": dict(context or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---- the trial cache --------------------------------------------------------------------------
class TrialCache:
    """Finished trials by :func:`signature`, in a JSON file rewritten atomically after every trial
    (``path`` None: in memory only). A file that is not a cache is an error, never overwritten."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self.trials: Dict[str, Dict[str, Any]] = {}
        if path and os.path.isfile(path):
            try:
                with open(path, "r", encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise SearchError(f"trial cache {path}: cannot be read ({e}); remove it to start the search over") from None
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("trials"), dict):
                raise SearchError(f"trial cache {path}: not a version-{CACHE_VERSION} search cache "
                                  "(expected {version, trials}); remove it or choose another output folder")
            self.trials = data["trials"]

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.trials.get(key)

    def put(self, key: str, record: Dict[str, Any]) -> None:
        self.trials[key] = record
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "trials": self.trials}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


@dataclass
class Trial:
    """One distinct schedule the search consulted."""

    key: str
    sizes: Tuple[int, ...]
    curriculum: Curriculum
    accuracy: float
    wall_s: float                 # seconds evaluate() took when it ran (the original run's, if cached)
    cached: bool                  # True: read from the cache, not evaluated by this call
    info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "sizes": list(self.sizes), "accuracy": self.accuracy, "wall_s": self.wall_s,
                "cached": self.cached, "curriculum": self.curriculum.to_dict(), "info": self.info}


@dataclass
class SearchResult:
    kind: str                     # et | etpp
    curriculum: Curriculum        # the schedule found
    accuracy: float               # its proxy accuracy
    baseline_accuracy: Optional[float]   # et: a0; etpp: the all-final-size schedule's (None if not trained)
    trials: List[Trial]           # distinct schedules, in the order first consulted
    steps: List[Dict[str, Any]]   # every decision: the stage, the sizes tried with their accuracy, the choice
    settings: Dict[str, Any]      # the search's inputs

    @property
    def sizes(self) -> List[int]:
        return [st.size for st in self.curriculum.stages]

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "settings": self.settings, "sizes": self.sizes, "accuracy": self.accuracy,
                "baseline_accuracy": self.baseline_accuracy, "curriculum": self.curriculum.to_dict(),
                "trials_run": sum(not t.cached for t in self.trials),
                "trials_cached": sum(t.cached for t in self.trials),
                "trials": [t.to_dict() for t in self.trials], "steps": self.steps}


class _Trials:
    """The search's view of ``evaluate``: one call per distinct schedule, through the cache."""

    def __init__(self, evaluate: Evaluate, make: Callable[[Sequence[int]], Curriculum], cache: TrialCache,
                 context: Optional[Mapping[str, Any]], log: Callable[[str], None]) -> None:
        self.evaluate, self.make, self.cache, self.context, self.log = evaluate, make, cache, context, log
        self.seen: Dict[Tuple[int, ...], Trial] = {}
        self.order: List[Trial] = []

    def __call__(self, sizes: Sequence[int]) -> float:
        sizes = tuple(int(s) for s in sizes)
        if sizes in self.seen:
            return self.seen[sizes].accuracy
        cur = self.make(sizes)
        key = signature(cur, self.context)
        rec = self.cache.get(key)
        if rec is not None:
            trial = Trial(key, sizes, cur, float(rec["accuracy"]), float(rec.get("wall_s", 0.0)), True,
                          dict(rec.get("info") or {}))
            self.log(f"[search] trial {len(self.order) + 1} {list(sizes)}: {trial.accuracy:.2f} (cached)")
        else:
            self.log(f"[search] trial {len(self.order) + 1} {list(sizes)}: training ...")
            t0 = time.perf_counter()
            out = self.evaluate(cur)
            wall = time.perf_counter() - t0
            info = {k: v for k, v in out.items() if k != "accuracy"} if isinstance(out, Mapping) else {}
            acc = out.get("accuracy") if isinstance(out, Mapping) else out
            if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
                raise ValueError(f"evaluate() returned {out!r} for {list(sizes)}; expected a finite accuracy "
                                 "(or a mapping with one under 'accuracy')")
            trial = Trial(key, sizes, cur, float(acc), wall, False, info)
            self.cache.put(key, {"sizes": list(sizes), "curriculum": cur.to_dict(), "context": dict(self.context or {}),
                                 "accuracy": trial.accuracy, "wall_s": wall, "info": info,
                                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            self.log(f"[search] trial {len(self.order) + 1} {list(sizes)}: {trial.accuracy:.2f} ({wall:.0f} s)")
        self.seen[sizes] = trial
        self.order.append(trial)
        return trial.accuracy


def _check_sizes(sizes: Sequence[int], num_stages: int) -> List[int]:
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise SearchError(f"sizes must be a non-empty list of positive integers (candidate input sizes, the largest "
                          f"is the final size), got {list(sizes)!r}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 2:
        raise SearchError(f"stages must be an integer >= 2 (the last one is at the final size), got {num_stages!r}")
    return sorted(set(sizes))


# ---- EfficientTrain, Algorithm 1 ----------------------------------------------------------------
def search_et(evaluate: Evaluate, sizes: Sequence[int], num_stages: int = 5, *, tolerance: float = 0.0,
              a0: Optional[float] = None, order: str = "down", max_magnitude: float = MAX_MAGNITUDE,
              cache: Optional[TrialCache] = None, context: Optional[Mapping[str, Any]] = None,
              name: str = "search-et", log: Callable[[str], None] = lambda m: None) -> SearchResult:
    """EfficientTrain's Algorithm 1 (see the module docstring for every choice): the smallest size
    per stage, from the last stage backwards, whose proxy accuracy is not below ``a0 - tolerance``."""
    cands = _check_sizes(sizes, num_stages)
    if order not in ET_ORDERS:
        raise SearchError(f"order: {order!r} is not allowed; allowed: {', '.join(ET_ORDERS)}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise SearchError(f"tolerance must be a number >= 0 (accuracy points), got {tolerance!r}")
    final = cands[-1]
    trials = _Trials(evaluate, lambda s: et_schedule(s, max_magnitude, name), cache or TrialCache(), context, log)
    chosen = [final] * num_stages
    base_acc = trials(chosen) if a0 is None else None
    ref = float(a0) if a0 is not None else base_acc
    threshold = ref - tolerance
    steps: List[Dict[str, Any]] = []
    for i in range(num_stages - 2, -1, -1):
        upper = chosen[i + 1]
        below = [s for s in cands if s <= upper]
        scan = below[::-1] if order == "down" else below
        tried: List[Dict[str, Any]] = []
        pick = None
        for b in scan:
            acc = trials([b] * (i + 1) + chosen[i + 1:])
            ok = acc >= threshold
            tried.append({"size": b, "accuracy": acc, "passed": ok})
            if order == "up" and ok:
                pick = b
                break
            if order == "down":
                if not ok:
                    break
                pick = b
        chosen[i] = pick if pick is not None else upper
        for j in range(i):          # stages before i share B until their own step decides them
            chosen[j] = chosen[i]
        steps.append({"stage": i, "tried": tried, "chosen": chosen[i], "passed": pick is not None})
        log(f"[search] stage {i}: size {chosen[i]}" + ("" if pick is not None else " (nothing passed: kept)"))
    result_acc = trials(chosen)
    return SearchResult("et", et_schedule(chosen, max_magnitude, name), result_acc, ref, trials.order, steps,
                        {"sizes": cands, "stages": num_stages, "tolerance": tolerance, "order": order,
                         "a0_given": a0 is not None, "max_magnitude": max_magnitude, "threshold": threshold})


# ---- EfficientTrain++, compute-constrained -------------------------------------------------------
def _fewer_samples_key(sizes: Sequence[int], final: int) -> float:
    """Sample epochs of a schedule relative to the all-final one (ties go to the smaller value)."""
    return sum((final / s) ** 2 for s in sizes)


def search_etpp(evaluate: Evaluate, sizes: Sequence[int], num_stages: int = 10, *, strategy: str = "greedy",
                max_magnitude: float = MAX_MAGNITUDE, cache: Optional[TrialCache] = None,
                context: Optional[Mapping[str, Any]] = None, name: str = "search-etpp",
                log: Callable[[str], None] = lambda m: None) -> SearchResult:
    """EfficientTrain++'s compute-constrained search (see the module docstring): the most accurate
    non-decreasing schedule of ``num_stages`` equal-compute sub-stages ending at the final size."""
    cands = _check_sizes(sizes, num_stages)
    if strategy not in ETPP_STRATEGIES:
        raise SearchError(f"strategy: {strategy!r} is not allowed; allowed: {', '.join(ETPP_STRATEGIES)}")
    final = cands[-1]
    trials = _Trials(evaluate, lambda s: etpp_schedule(s, max_magnitude, name), cache or TrialCache(), context, log)
    steps: List[Dict[str, Any]] = []
    if strategy == "exhaustive":
        scored = []
        for combo in itertools.combinations_with_replacement(cands, num_stages - 1):   # non-decreasing
            sched = [*combo, final]
            scored.append(((trials(sched), -_fewer_samples_key(sched, final)), sched))
        best = max(scored, key=lambda x: x[0])[1]
        steps.append({"stage": None, "schedules": len(scored), "chosen": best})
    else:
        best = [final] * num_stages
        for i in range(num_stages - 1):
            lo = best[i - 1] if i else cands[0]
            tried = []
            for b in (s for s in cands if lo <= s):
                tried.append({"size": b, "accuracy": trials(best[:i] + [b] + [final] * (num_stages - 1 - i))})
            top = max(tried, key=lambda t: (t["accuracy"], t["size"]))     # ties: the larger size
            best[i] = top["size"]
            steps.append({"stage": i, "tried": tried, "chosen": best[i]})
            log(f"[search] sub-stage {i}: size {best[i]}")
            if best[i] == final:
                break                   # sizes never decrease: the rest stay at the final size
    base = trials.seen.get(tuple([final] * num_stages))
    return SearchResult("etpp", etpp_schedule(best, max_magnitude, name), trials(best),
                        base.accuracy if base else None, trials.order, steps,
                        {"sizes": cands, "stages": num_stages, "strategy": strategy, "max_magnitude": max_magnitude})
