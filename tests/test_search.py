"""Curriculum searches: EfficientTrain's Algorithm 1 and the EfficientTrain++ compute-constrained
search on synthetic accuracy functions with known answers (no training), the trial cache (a
second search trains nothing, an interrupted one continues), the proxy YAML's errors, and one
tiny end-to-end search through the CLI whose curriculum pretraining accepts."""
import itertools
import json
import os
from pathlib import Path

import pytest
import yaml

from efficienttrain.curriculum import Curriculum, et as builtin_et
from efficienttrain.search import (SearchError, TrialCache, et_schedule, etpp_schedule, search_et, search_etpp,
                                   signature)
from engine.config import ConfigError
from evaluation.curriculum import main as cli

ROOT = Path(__file__).resolve().parents[1]


def sizes_of(cur):
    return [st.size for st in cur.stages]


class Counting:
    """A synthetic accuracy ``fn(sizes)`` that records every schedule it was asked for."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.fail_at, self.calls = fn, fail_at, []

    def __call__(self, cur):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("stopped mid-search")
        self.calls.append(sizes_of(cur))
        return self.fn(sizes_of(cur))


def needs(need, a0=80.0, slope=0.5):
    """Accuracy a0 when every stage is at least its ``need``, minus ``slope`` points per 32 px short."""
    return lambda s: a0 - sum(slope * max(0, n - x) / 32 for n, x in zip(need, s))


# ---- EfficientTrain, Algorithm 1 ----------------------------------------------------------------
def test_et_finds_table5_schedule_in_the_papers_seven_trials():
    """Table 5's 160,160,160,192,224 (5 stages, candidates 128..224 in steps of 32) as the known
    answer: the smallest sizes whose accuracy stays at a0. 128 is a candidate but never the answer.
    The down scan trains the baseline and 2+2+1+1 more, the 7 runs Sec. 4.3 reports."""
    need = [160, 160, 160, 192, 224]
    ev = Counting(needs(need))
    res = search_et(ev, [224, 128, 192, 160], 5)
    assert res.sizes == need and res.baseline_accuracy == 80.0 and res.accuracy == 80.0
    assert len(ev.calls) == 7 and len({tuple(c) for c in ev.calls}) == 7
    assert ev.calls[0] == [224] * 5                                       # a0 first
    # Algorithm 1's definition, checked directly: stages 1..i one size lower fail, stage by stage
    lower = {224: 192, 192: 160, 160: 128}
    for i in range(4):
        assert needs(need)([lower[need[i]]] * (i + 1) + need[i + 1:]) < 80.0
    cur = res.curriculum
    assert cur.budget == "epochs" and [st.share for st in cur.stages] == [0.2] * 5
    # same compute as the paper's Table 5 form (the built-in `et`): 195.92 equivalent epochs of 300
    assert cur.compute(300) == pytest.approx(builtin_et().compute(300))
    assert [st.magnitude_at(0) for st in cur.stages] == pytest.approx([0, 1.8, 3.6, 5.4, 7.2])   # m = 9 t / T
    # the up scan finds the same minimum on this monotone function, at more trials
    up = Counting(needs(need))
    assert search_et(up, [128, 160, 192, 224], 5, order="up").sizes == need and len(up.calls) > 7


def test_et_tolerance_order_and_a_given_a0():
    """A dip at 48 px: the down scan stops at its first failure, the up scan finds 32 below it;
    a tolerance of one point lets the dip pass."""
    def dip(s):
        return 70.0 - (1.0 if 48 in s else 0.0)

    assert search_et(Counting(dip), [32, 48, 64], 3).sizes == [64, 64, 64]
    assert search_et(Counting(dip), [32, 48, 64], 3, order="up").sizes == [32, 32, 64]
    assert search_et(Counting(dip), [32, 48, 64], 3, tolerance=1.0).sizes == [32, 32, 64]
    assert search_et(Counting(dip), [32, 48, 64], 3, tolerance=0.99).sizes == [64, 64, 64]
    # a0 given above what anything reaches: nothing passes, every stage keeps the final size
    ev = Counting(lambda s: 70.0)
    res = search_et(ev, [32, 48, 64], 3, a0=71.0)
    assert res.sizes == [64, 64, 64] and res.baseline_accuracy == 71.0
    assert [st["passed"] for st in res.steps] == [False, False] and ev.calls == [[64, 64, 64]]
    with pytest.raises(SearchError, match="order: 'sideways' is not allowed; allowed: down, up"):
        search_et(ev, [32, 64], 3, order="sideways")
    with pytest.raises(SearchError, match="stages must be an integer >= 2"):
        search_et(ev, [32, 64], 1)


# ---- EfficientTrain++, compute-constrained -------------------------------------------------------
def brute_force(fn, cands, k):
    """Independent reference: every size sequence, keep the non-decreasing ones ending at the
    largest size, the most accurate (ties: fewer sample epochs)."""
    final = max(cands)
    ok = [list(s) for s in itertools.product(cands, repeat=k)
          if list(s) == sorted(s) and s[-1] == final]
    return max(ok, key=lambda s: (fn(s), -sum((final / b) ** 2 for b in s)))


def test_etpp_finds_the_official_schedule_and_matches_brute_force():
    """Each sub-stage prefers a size (the official 96 x2, 160 x4, 224 x4) with a small interaction
    (stepping up twice costs 0.1): the greedy search and the exhaustive one find the known optimum,
    the same as a brute force over all 10-long sequences' non-decreasing ones."""
    pref = [96, 96, 160, 160, 160, 160, 224, 224, 224, 224]

    def acc(s):
        return 80.0 - sum(abs(x - p) / 64 for x, p in zip(s, pref)) - 0.1 * sum(b > a for a, b in zip(s, s[1:]))

    greedy = Counting(acc)
    res = search_etpp(greedy, [96, 160, 224], 10)
    assert res.sizes == pref == brute_force(acc, [96, 160, 224], 10)
    assert len(greedy.calls) == len({tuple(c) for c in greedy.calls}) <= 1 + 9 * 2
    assert res.baseline_accuracy == acc([224] * 10)                       # the all-224 schedule was a trial
    exhaustive = Counting(acc)
    res2 = search_etpp(exhaustive, [96, 160, 224], 10, strategy="exhaustive")
    assert res2.sizes == pref and len(exhaustive.calls) == 55               # C(11, 2) schedules
    # every trial has the same compute: E equivalent epochs, split in equal-compute sub-stages
    for sizes in exhaustive.calls[:5]:
        cur = etpp_schedule(sizes)
        assert cur.budget == "compute" and cur.compute(200) == pytest.approx(200)
        assert cur.sample_epochs(200)[0] == pytest.approx(20 * (224 / sizes[0]) ** 2)
    assert [st.magnitude for st in res.curriculum.stages] == list(range(10))   # m = 0..9, as the official


def test_etpp_ties_go_to_fewer_sample_epochs_and_greedy_is_a_heuristic():
    flat = Counting(lambda s: 50.0)
    assert search_etpp(flat, [32, 48, 64], 4).sizes == [64] * 4 and len(flat.calls) == 3
    assert search_etpp(Counting(lambda s: 50.0), [32, 48, 64], 4, strategy="exhaustive").sizes == [64] * 4

    # a trap for the greedy one: 32 first looks best, but only 48, 48 pays off; exhaustive finds it
    def trap(s):
        return {(48, 48, 64): 60.0}.get(tuple(s), 50.0 + (s[0] == 32))

    assert search_etpp(Counting(trap), [32, 48, 64], 3).sizes == [32, 64, 64]
    assert search_etpp(Counting(trap), [32, 48, 64], 3, strategy="exhaustive").sizes == [48, 48, 64]
    assert brute_force(trap, [32, 48, 64], 3) == [48, 48, 64]


# ---- the trial cache ----------------------------------------------------------------------------
def test_cache_second_search_trains_nothing_and_context_separates_proxies(tmp_path):
    path = str(tmp_path / "trials.json")
    need = [160, 160, 160, 192, 224]
    first = Counting(needs(need))
    res = search_et(first, [128, 160, 192, 224], 5, cache=TrialCache(path), context={"proxy": "a"})
    again = Counting(needs(need))
    res2 = search_et(again, [128, 160, 192, 224], 5, cache=TrialCache(path), context={"proxy": "a"})
    assert again.calls == [] and res2.sizes == res.sizes and all(t.cached for t in res2.trials)
    assert [t.accuracy for t in res2.trials] == [t.accuracy for t in res.trials]
    on_disk = json.load(open(path))
    assert on_disk["version"] == 1 and len(on_disk["trials"]) == 7
    other = Counting(needs(need))                                           # another proxy: its own trials
    search_et(other, [128, 160, 192, 224], 5, cache=TrialCache(path), context={"proxy": "b"})
    assert len(other.calls) == 7
    assert signature(et_schedule([160, 224]), {"proxy": "a"}) != signature(etpp_schedule([160, 224]), {"proxy": "a"})


def test_interrupted_search_continues_without_repeating_trials(tmp_path):
    path = str(tmp_path / "trials.json")
    pref = [96, 96, 160, 224]

    def acc(s):
        return -sum(abs(x - p) for x, p in zip(s, pref))

    stopped = Counting(acc, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        search_etpp(stopped, [96, 160, 224], 4, cache=TrialCache(path))
    assert len(stopped.calls) == 3 and len(json.load(open(path))["trials"]) == 3   # written after every trial
    resumed = Counting(acc)
    res = search_etpp(resumed, [96, 160, 224], 4, cache=TrialCache(path))
    assert res.sizes == pref
    done = [tuple(c) for c in stopped.calls + resumed.calls]
    assert len(done) == len(set(done))                                       # no trial trained twice
    uninterrupted = Counting(acc)
    search_etpp(uninterrupted, [96, 160, 224], 4)
    assert sorted(done) == sorted(tuple(c) for c in uninterrupted.calls)
    assert [t.cached for t in res.trials][:3] == [True] * 3 and not any(t.cached for t in res.trials[3:])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SearchError, match=r"bad.json: cannot be read .*remove it to start the search over"):
        TrialCache(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="expected a finite accuracy"):
        search_etpp(lambda cur: float("nan"), [96, 224], 2)


# ---- the proxy YAML, the CLI and one tiny real search -------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from engine.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("labelled") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def proxy_yaml(tmp_path, folder, **extra):
    from test_pretrain import tiny_overrides

    base = tmp_path / "base.yaml"
    base.write_text("")
    keep = [o for o in tiny_overrides("unused", "unused") if not o.startswith(("data.path", "train.output_dir"))]
    text = {"name": "tiny", "kind": "pretrain", "config": str(base), "overrides": keep, "data": folder,
            "search": "et", "budget": 1.0, "stages": 2, "sizes": [32], "knn": {"k": 5},
            "output_dir": str(tmp_path / "search"), **extra}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def test_bad_proxy_configs_name_the_key(folder, tmp_path, capsys):
    from evaluation.search_runner import ProxyRunner, load_proxy

    path = str(proxy_yaml(tmp_path, folder))
    for overrides, message in [
        (["size=[32]"], r"unknown key\(s\) size \(did you mean sizes\?\)"),
        (["kind=dino"], "kind: 'dino' is not allowed; allowed: pretrain, supervised"),
        (["search=grid"], "search: 'grid' is not allowed; allowed: et, etpp"),
        (["budget=0"], "budget must be > 0"),
        (["stages=1"], "stages must be >= 2"),
        (["sizes=[]"], "sizes must be a non-empty list of distinct positive input sizes"),
        (["sizes=[32, 32]"], "sizes must be a non-empty list of distinct"),
        (["search=etpp", "tolerance=0.5"], "tolerance applies to search: et only; this proxy has search: etpp"),
        (["strategy=greedy"], "strategy applies to search: etpp only"),
        (["order=random"], "order: 'random' is not allowed; allowed: down, up"),
        (["tolerance=-1"], "tolerance must be >= 0"),
        (["config=nowhere.yaml"], "config: 'nowhere.yaml' is not a file"),
        (["knn.k=0"], "knn: feature must be cls or avgpool, k and batch_size >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_proxy(path, overrides)
    for overrides, message in [
        ([f"data={tmp_path}"], "data: .* is not a folder; data must be an ImageFolder root with train/ and val/"),
        (["sizes=[16, 24]"], r"sizes: the largest candidate \(24\) must be the final size .*model.img_size = 32"),
        (["sizes=[12, 32]"], "size 12 is not a multiple of 8"),
        (["overrides=[model.depht=2]"], r"unknown key\(s\) model.depht"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ProxyRunner(load_proxy(path, overrides), log=lambda m: None).check()
    assert not (tmp_path / "search" / "trials.json").exists()                 # nothing ran
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    for args in (["search", str(tmp_path / "broken.yaml")], ["search", path, "search=grid"],
                 ["search", str(tmp_path / "missing.yaml")]):
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("not valid YAML" in err or "search: 'grid'" in err
                                              or "does not exist" in err)


def test_tiny_search_end_to_end_writes_a_curriculum_pretraining_accepts(folder, tmp_path, capsys):
    """One real trial (sizes [32]: the baseline is the whole search): a pretraining subprocess, its
    kNN top-1, the outputs; a second call reads it back; the YAML found loads and a pretraining
    dry run takes it as curriculum.name."""
    from pretrain.main import main as pretrain_main
    from test_pretrain import tiny_overrides

    path = proxy_yaml(tmp_path, folder)
    out = tmp_path / "search"
    assert cli(["search", str(path)]) == 0
    report = json.load(open(out / "search.json"))
    assert report["trials_run"] == 1 and report["sizes"] == [32, 32] and 0 <= report["accuracy"] <= 100
    run_dir = report["trials"][0]["info"]["run_dir"]
    assert os.path.isfile(os.path.join(run_dir, "encoder.pth"))
    evaluation = json.load(open(os.path.join(run_dir, "evaluation.json")))
    assert report["accuracy"] == evaluation["knn"]["top1"] and evaluation["knn"]["k"] == 5
    cur = Curriculum.from_yaml(out / "curriculum.yaml", multiple_of=8)
    assert sizes_of(cur) == [32, 32] and cur.stages == et_schedule([32, 32]).stages and cur.name == "tiny"
    md = (out / "search.md").read_text()
    assert "| 1 | 32, 32 **(found)** |" in md and "| run |" in md
    capsys.readouterr()
    assert cli(["search", str(path)]) == 0                                  # everything cached
    again = json.load(open(out / "search.json"))
    assert again["trials_run"] == 0 and again["trials_cached"] == 1 and again["accuracy"] == report["accuracy"]
    assert "| cached |" in (out / "search.md").read_text()
    # another metric setting: a new trial for the cache, but the finished run is only evaluated again
    log_size = os.path.getsize(os.path.join(run_dir, "train.log"))
    assert cli(["search", str(path), "knn.k=3"]) == 0
    third = json.load(open(out / "search.json"))
    assert third["trials_run"] == 1 and third["trials"][0]["info"]["run_dir"] == run_dir
    assert json.load(open(os.path.join(run_dir, "evaluation.json")))["knn"]["k"] == 3
    assert os.path.getsize(os.path.join(run_dir, "train.log")) == log_size          # nothing trained
    dry = tiny_overrides(os.path.join(folder, "train"), str(tmp_path / "dry"),
                         f"curriculum.name={out / 'curriculum.yaml'}", "curriculum.epochs=1")
    assert pretrain_main([*dry, "--dry-run"]) == 0
    assert "curriculum tiny" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(os.listdir(ROOT / "configs" / "search")))
def test_shipped_search_configs_check_out(name, folder, tmp_path, monkeypatch):
    """Every shipped proxy loads, and its training config, overrides and candidate sizes resolve
    (the labelled folder stands in for its data)."""
    from evaluation.search_runner import ProxyRunner, load_proxy

    monkeypatch.chdir(ROOT)
    proxy = load_proxy(os.path.join("configs", "search", name), [f"output_dir={tmp_path}", f"data={folder}",
                                                                 "demo=false"])
    runner = ProxyRunner(proxy, log=lambda m: None)
    runner.check()
    assert runner.context["config"]["model"]["img_size"] == max(proxy.sizes)
