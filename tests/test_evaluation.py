"""Evaluation: the weighted kNN rule against a hand computation, the monitor leaves training
untouched, the cached linear probe, evaluating a finished run, and the study runner (report,
skip and resume, bad study files)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.demo_data import generate_demo_dataset
from engine.knn import knn_accuracy, knn_votes
from evaluation.probe import linear_probe
from evaluation.study import StudyConfig, compare, mean_sd, run_study
from pretrain.config import PretrainConfig
from pretrain.main import run

from test_pretrain import read_metrics, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_knn_rule_by_hand():
    """Two queries, four bank points, k=2, T=0.5 (hand-computed cosine similarities):
    q0 = (0.8, 0.6): neighbours (0.6, 0.8) [s=0.96, class 1] and (1, 0) [s=0.8, class 0], so
    votes are exp(1.92) for class 1 and exp(1.6) for class 0: predicted 1 (label 0: wrong).
    q1 = (-0.9, 0.1): neighbours (-1, 0) [s=0.9939, class 2] and (0, 1) [s=0.1104, class 1]:
    predicted 2 (right)."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    bank_y = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[0.8, 0.6], [-0.9, 0.1]])
    votes = knn_votes(bank, bank_y, q, k=2, temperature=0.5, num_classes=3)
    s = 0.9 / math.hypot(0.9, 0.1), 0.1 / math.hypot(0.9, 0.1)
    expected = torch.tensor([[math.exp(1.6), math.exp(1.92), 0.0], [0.0, math.exp(s[1] / 0.5), math.exp(s[0] / 0.5)]])
    torch.testing.assert_close(votes, expected, rtol=1e-5, atol=1e-6)
    acc = knn_accuracy(bank, bank_y, q, torch.tensor([0, 2]), k=2, temperature=0.5, num_classes=3)
    assert acc == {"top1": 50.0, "top5": 100.0}                 # top-5 of 3 classes: all
    # k=1 is the nearest neighbour; scale of the features does not matter (cosine)
    acc1 = knn_accuracy(3 * bank, bank_y, q, torch.tensor([0, 2]), k=1, temperature=0.07, num_classes=3)
    assert acc1["top1"] == 50.0
    with pytest.raises(ValueError, match="k must be between 1 and the number of training samples"):
        knn_votes(bank, bank_y, q, k=5, temperature=0.5, num_classes=3)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    yv = torch.arange(90) % 3
    xv = centers[yv] + torch.randn(90, 16, generator=g)
    acc = linear_probe(x, y, xv, yv, 3, epochs=30)
    assert acc["top1"] > 95.0
    noise = linear_probe(torch.randn(300, 16, generator=g), y, torch.randn(90, 16, generator=g), yv, 3, epochs=30)
    assert noise["top1"] < 60.0                                   # chance is 33 %: the probe cannot make it up


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled demo set: train/ and val/ with 4 classes."""
    root = tmp_path_factory.mktemp("labelled") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def cfg_for(*overrides):
    return load_config(PretrainConfig, None, list(overrides))


def test_knn_monitor_logs_every_stage_end_and_leaves_training_unchanged(folder, tmp_path):
    train = os.path.join(folder, "train")
    plain = run(cfg_for(*tiny_overrides(train, tmp_path / "plain")))
    knn = [f"eval.knn.train={train}", f"eval.knn.val={os.path.join(folder, 'val')}", "eval.knn.k=5",
           "eval.knn.batch_size=7"]
    mon = run(cfg_for(*tiny_overrides(train, tmp_path / "mon", *knn)))
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "mon")
    losses_a = [r["loss"] for r in a if "loss" in r]
    losses_b = [r["loss"] for r in b if "loss" in r]
    assert losses_a == losses_b and plain["loss"] == mon["loss"]       # bit for bit
    evals = [r for r in b if "knn_top1" in r]
    plan = json.load(open(tmp_path / "mon" / "plan.json"))["rows"]
    assert [r["step"] for r in evals] == [r["end_step"] for r in plan]    # every stage end
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_top5"] == 100.0 for r in evals)   # 4 classes: top-5 is all
    assert evals[-1]["budget"] == 1.0 and evals[-1]["wall_s"] > evals[0]["wall_s"]
    assert (tmp_path / "mon" / "knn_top1.png").is_file()
    summary = json.load(open(tmp_path / "mon" / "summary.json"))
    assert summary["eval"]["knn_top1"] == evals[-1]["knn_top1"]
    # running the finished run again trains nothing and keeps its results
    again = run(cfg_for(*tiny_overrides(train, tmp_path / "mon", *knn)))
    assert again["eval"] and json.load(open(tmp_path / "mon" / "summary.json"))["eval"] == summary["eval"]


def test_knn_config_errors(folder, capsys, tmp_path):
    from pretrain.main import main

    train = os.path.join(folder, "train")
    other = tmp_path / "other"                                 # one class folder renamed
    shutil.copytree(os.path.join(folder, "val"), other)
    first = sorted(os.listdir(other))[0]
    os.rename(other / first, other / "zz_extra")
    assert main([f"data.path={train}", f"eval.knn.train={train}", f"eval.knn.val={other}"]) == 2
    assert f"only in {train}: ['{first}'], only in {other}: ['zz_extra']" in capsys.readouterr().err
    assert main([f"data.path={train}", f"eval.knn.train={train}"]) == 2
    assert "set both train and val" in capsys.readouterr().err
    assert main([f"data.path={train}", f"eval.knn.train={train}", f"eval.knn.val={train}", "eval.knn.feature=mean"]) == 2
    assert "eval.knn.feature: 'mean' is not allowed; allowed: cls, avgpool" in capsys.readouterr().err


def test_evaluate_a_finished_run(folder, tmp_path):
    out = tmp_path / "run"
    run(cfg_for(*tiny_overrides(os.path.join(folder, "train"), out)))
    r = subprocess.run([sys.executable, "-m", "evaluation", str(out), "--data", folder, "--k", "5",
                        "--probe-epochs", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "evaluation.json"))
    assert 0 <= res["knn"]["top1"] <= 100 and 0 <= res["probe"]["top1"] <= 100 and res["knn"]["k"] == 5
    # the same numbers as the rule on features extracted here from encoder.pth
    from engine.data import EvalDataset, eval_transform, image_folder
    from engine.knn import extract_features
    from evaluation.run_eval import load_encoder, pooled

    vit, meta = load_encoder(str(out / "encoder.pth"))
    tf = eval_transform(32, 0.875)
    feats = [extract_features(pooled(vit, "cls"), EvalDataset(*image_folder(os.path.join(folder, s))[:2], tf),
                              torch.device("cpu")) for s in ("train", "val")]
    assert knn_accuracy(*feats[0], *feats[1], k=5, num_classes=4)["top1"] == res["knn"]["top1"]
    # a short fine-tune from the encoder; running it again reads the finished fine-tune back
    ft = [sys.executable, "-m", "evaluation", str(out), "--data", folder, "--no-knn", "--no-probe",
          "--finetune-epochs", "1", "--finetune-set", "train.batch_size=8", "--finetune-set", "data.num_workers=0"]
    for _ in range(2):
        r = subprocess.run(ft, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        res2 = json.load(open(out / "evaluation.json"))
        assert 0 <= res2["finetune"]["top1"] <= 100 and res2["knn"] == res["knn"]      # same data: kept
    ft_runs = os.listdir(out / "eval_finetune")
    assert len(ft_runs) == 1 and res2["finetune"]["run_dir"].endswith(ft_runs[0])
    r = subprocess.run(ft[:-2] + ["--finetune-set", "train.lr=1e-4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(out / "eval_finetune")) == 2            # another setting: another run, not a resume
    r = subprocess.run([sys.executable, "-m", "evaluation", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist: give the folder of a pretraining run" in r.stderr


def study_yaml(tmp_path, folder, **extra):
    base = tmp_path / "base.yaml"
    overrides = tiny_overrides("unused", "unused")
    keep = [o for o in overrides if not o.startswith(("data.path", "train.output_dir"))]
    base.write_text("")
    text = {"name": "tiny", "config": str(base), "data": folder, "overrides": keep,
            "arms": [{"name": "base", "overrides": ["curriculum.name=baseline", "curriculum.epochs=2"], "baseline": True},
                     {"name": "etpp", "overrides": ["curriculum.name=etpp", "curriculum.epochs=1",
                                                    "curriculum.baseline_epochs=2"]}],
            "evaluation": {"k": 5, "probe_epochs": 5}, "output_dir": str(tmp_path / "study"), **extra}
    path = tmp_path / "study.yaml"
    import yaml
    path.write_text(yaml.safe_dump(text))
    return path


def test_study_runs_reports_skips_and_resumes(folder, tmp_path):
    path = study_yaml(tmp_path, folder)
    study = load_config(StudyConfig, str(path))
    logs = []
    report = run_study(study, "test", log=logs.append)
    assert [a["arm"] for a in report["arms"]] == ["base", "etpp"]
    base, etpp = report["arms"]
    assert base["measured_speedup"] == 1.0 and etpp["measured_speedup"] == pytest.approx(
        base["wall_s"]["mean"] / etpp["wall_s"]["mean"])
    assert base["flops_saving"] == 1.0 and etpp["train_flops"] < base["train_flops"]
    assert etpp["planned_speedup"] == pytest.approx(2.0) and 1.0 < etpp["flops_saving"] < 2.0   # small grids cost more per pixel
    assert etpp["equivalent_epochs"] == pytest.approx(1.0, rel=0.05) and etpp["curriculum"] == "etpp"
    assert set(etpp["accuracy"]) == {"knn", "probe"} and "single seed" in etpp["vs_baseline"]["knn"]
    out = tmp_path / "study"
    for name in ("study.md", "study.json", "study.png"):
        assert (out / name).is_file()
    assert "| etpp |" in (out / "study.md").read_text()
    # rerun: both arms are read back, nothing is trained
    logs.clear()
    run_study(study, "test", log=logs.append)
    assert sum("skipped" in m for m in logs) == 2 and not any("training" in m for m in logs)
    # an interrupted arm (stopped after 2 of its steps) is resumed to its end, the other skipped
    rec = out / "etpp" / "seed0"
    first = json.load(open(rec / "study_arm.json"))
    shutil.rmtree(rec)
    r = subprocess.run([sys.executable, *first["command"], "train.max_steps=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in read_metrics(rec) if "loss" in x][-1] == 2
    logs.clear()
    run_study(study, "test", log=logs.append)
    assert any("etpp seed 0: resuming" in m for m in logs) and sum("skipped" in m for m in logs) == 1
    assert "resumed from" in (rec / "train.log").read_text()
    steps = json.load(open(rec / "plan.json"))["rows"][-1]["end_step"]
    assert steps > 2 and [x["step"] for x in read_metrics(rec) if "loss" in x][-1] == steps
    again = json.load(open(rec / "study_arm.json"))
    assert again["arm"] == "etpp" and again["eval"] == first["eval"]     # resume is exact: the same encoder
    # --only: the other arm is read back (its hashes checked), not run
    logs.clear()
    run_study(study, "test", log=logs.append, only=["base"])
    assert sum("skipped" in m for m in logs) == 1 and os.path.isfile(out / "study.md")
    # changed evaluation settings: finished arms are evaluated again, not retrained
    logs.clear()
    run_study(load_config(StudyConfig, str(path), ["evaluation.probe_epochs=6"]), "test", log=logs.append)
    assert sum("evaluating again" in m for m in logs) == 2 and not any("training" in m for m in logs)
    # a changed study for a finished arm is refused, not mixed in
    changed = study_yaml(tmp_path, folder, seeds=[0])
    study2 = load_config(StudyConfig, str(changed))
    study2.overrides = [*study2.overrides, "train.blr=0.5"]
    with pytest.raises(ConfigError, match="was run with another command"):
        run_study(study2, "test", log=logs.append)


def test_bad_study_files_get_clear_errors(folder, tmp_path):
    path = study_yaml(tmp_path, folder)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) arm \(did you mean arms\?\); allowed in config: name, "):
        load_config(StudyConfig, str(path), ["arm=[]"])
    with pytest.raises(ConfigError, match="exactly one arm must have baseline: true"):
        load_config(StudyConfig, str(path), ["arms=[{name: a}, {name: b}]"])
    with pytest.raises(ConfigError, match=r"duplicate arm names \['a'\]"):
        load_config(StudyConfig, str(path), ["arms=[{name: a, baseline: true}, {name: a}]"])
    with pytest.raises(ConfigError, match="kind: 'dino' is not allowed; allowed: pretrain, supervised"):
        load_config(StudyConfig, str(path), ["kind=dino"])
    with pytest.raises(ConfigError, match="is not a folder; data must be an ImageFolder root with train/ and val/"):
        load_config(StudyConfig, str(path), [f"data={tmp_path}"])
    r = subprocess.run([sys.executable, "tools/study.py", str(path), "kind=dino"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "error: " in r.stderr
    # a typo in an arm is caught before the first arm trains
    bad_arm = ["arms=[{name: a, baseline: true, overrides: [curriculum.name=baseline]}, "
               "{name: b, overrides: [curriculum.name=etpx]}]"]
    with pytest.raises(ConfigError, match=r"arm 'b' .*etpx"):
        run_study(load_config(StudyConfig, str(path), bad_arm), "test", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"arm 'a' .*curriculum.epoks"):
        run_study(load_config(StudyConfig, str(path), ["arms=[{name: a, baseline: true, overrides: [curriculum.epoks=2]}]"]),
                  "test", log=lambda m: None)
    assert not (tmp_path / "study" / "a").exists()
    with pytest.raises(ConfigError, match=r"arm 'b' equal_compute: 'c' must name another arm of the study \(a\)"):
        load_config(StudyConfig, str(path), ["arms=[{name: a, baseline: true}, {name: b, equal_compute: c}]"])
    with pytest.raises(ConfigError, match=r"arm 'a' equal_compute: 'a' must name another arm"):
        load_config(StudyConfig, str(path), ["arms=[{name: a, baseline: true, equal_compute: a}]"])


def test_study_shares_runs_between_processes_and_pairs_equal_compute_arms(folder, tmp_path):
    """An (arm, seed) another process holds (its study.lock) is skipped and the report waits for it;
    an arm with equal_compute is reported against that arm (FLOPs ratio, differences, joined plot)."""
    from engine.stops import RunLock
    from evaluation.study import STUDY_LOCK

    path = study_yaml(tmp_path, folder)
    arms = ("arms=[{name: base, baseline: true, overrides: [curriculum.name=baseline, curriculum.epochs=2]}, "
            "{name: short, overrides: [curriculum.name=baseline, curriculum.epochs=1]}, "
            "{name: etpp, equal_compute: short, overrides: [curriculum.name=etpp, curriculum.epochs=1, "
            "curriculum.baseline_epochs=2]}]")
    study = load_config(StudyConfig, str(path), [arms])
    held = tmp_path / "study" / "etpp" / "seed0"
    logs = []
    with RunLock(str(held), "another study process", name=STUDY_LOCK):
        res = run_study(study, "test", log=logs.append)
    assert any("etpp seed 0: in use by" in m and "another study process" in m for m in logs), logs
    assert "arms" not in res and not (held / "train.log").exists() and not (tmp_path / "study" / "study.json").exists()
    assert any("not finished yet: etpp seed 0" in m for m in logs)
    logs.clear()
    report = run_study(study, "test", log=logs.append)           # the lock released: it runs now
    assert sum("skipped" in m for m in logs) == 2 and any("etpp seed 0: training" in m for m in logs)
    arm = {a["arm"]: a for a in report["arms"]}
    [pair] = report["equal_compute"]
    assert pair["arm"] == "etpp" and pair["equal_compute"] == "short"
    assert pair["flops_ratio"] == pytest.approx(arm["etpp"]["train_flops"] / arm["short"]["train_flops"])
    assert pair["wall_ratio"] == pytest.approx(arm["etpp"]["wall_s"]["mean"] / arm["short"]["wall_s"]["mean"])
    for m in ("knn", "probe"):
        diff = arm["etpp"]["accuracy"][m]["mean"] - arm["short"]["accuracy"][m]["mean"]
        assert pair["difference"][m] == pytest.approx(diff)
        assert pair["vs_equal_compute"][m].startswith(f"{diff:+.2f} (single seed")
    md = (tmp_path / "study" / "study.md").read_text()
    assert "At equal compute" in md and f"| etpp | short | {pair['flops_ratio']:.3f} |" in md
    assert json.load(open(tmp_path / "study" / "study.json"))["equal_compute"][0]["arm"] == "etpp"
    assert (tmp_path / "study" / "study.png").stat().st_size > 0


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "study"))))
def test_shipped_studies_load_and_every_arm_resolves(name, folder, monkeypatch):
    from evaluation.study import check_arms

    monkeypatch.chdir(ROOT)
    study = load_config(StudyConfig, os.path.join("configs", "study", name), [f"data={folder}"])
    check_arms(study)
    assert sum(a.baseline for a in study.arms) == 1 and len(study.arms) >= 2


def test_seed_spread_decides_what_counts_as_a_difference():
    base = mean_sd([70.0, 72.0, 71.0])
    assert base["mean"] == 71.0 and base["sd"] == pytest.approx(1.0)
    assert "within noise" in compare(mean_sd([71.5, 72.5, 73.0]), base)       # +1.33 vs 2 x SE 1.05
    assert "better" in compare(mean_sd([75.0, 76.0, 75.5]), base)
    assert "worse" in compare(mean_sd([60.0, 61.0, 60.5]), base)
    assert "single seed" in compare(mean_sd([80.0]), mean_sd([70.0]))
    # a single-seed arm borrows the other arm's spread: 2 x SE = 2 x sqrt(1 / 1 + 1 / 3) = 2.31
    assert "better" in compare(mean_sd([80.0]), base) and "within noise" in compare(mean_sd([73.0]), base)
    # many seeds: 2 x SE (0.94) shrinks below the spread (sd 1.05); a +1.0 difference stays within noise
    ten = [70.0 + (1.0 if i % 2 else -1.0) for i in range(10)]
    shifted = mean_sd([v + 1.0 for v in ten])
    assert "within noise" in compare(shifted, mean_sd(ten)) and "better" in compare(mean_sd([v + 1.2 for v in ten]), mean_sd(ten))


def _gather_worker(rank, world, port, n, out):
    import torch.distributed as tdist
    from engine.distributed import DistInfo
    from engine.knn import extract_features

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = torch.utils.data.TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3),
                                              torch.arange(n) % 4)
        f, y = extract_features(lambda x: x * 2, data, torch.device("cpu"), DistInfo(rank, world, rank), batch_size=2)
        torch.save((f, y), os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("n", [7, 1])          # uneven shards; a rank with no sample at all
def test_sharded_extraction_gathers_every_sample_once_in_order(n, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, n, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        f, y = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(f, 2 * torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3))
        assert torch.equal(y, torch.arange(n) % 4)


def _knn_data():
    g = torch.Generator().manual_seed(0)
    bank = torch.utils.data.TensorDataset(torch.randn(11, 8, generator=g), torch.randint(0, 3, (11,), generator=g))
    query = torch.utils.data.TensorDataset(torch.randn(7, 8, generator=g), torch.randint(0, 3, (7,), generator=g))
    return bank, query


def _bank_worker(rank, world, port, out):
    import torch.distributed as tdist
    from engine.distributed import DistInfo
    from engine.knn import accuracy_of, extract_bank, extract_features, knn_counts

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bank, query = _knn_data()
        dist = DistInfo(rank, world, rank)
        b, by = extract_bank(lambda x: x, bank, torch.device("cpu"), dist, batch_size=2)
        q, qy = extract_features(lambda x: x, query, torch.device("cpu"), dist, batch_size=2, gather=False)
        counts = knn_counts(b, by, q, qy, 3, 0.1, 3)
        tdist.all_reduce(counts)
        torch.save((accuracy_of(counts), b.dtype, b.shape, len(q)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_sharded_knn_equals_one_process(tmp_path):
    """The monitor's way on two ranks (bf16 bank gathered into one buffer, uneven shards padded,
    each rank scoring its own queries, hit counts summed) gives one process's accuracy, which is
    the float32 rule's; scoring the bank in blocks changes nothing."""
    import socket

    import torch.multiprocessing as mp
    from engine.knn import extract_bank, knn_votes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    bank, query = _knn_data()
    single = knn_accuracy(*bank.tensors, *query.tensors, k=3, temperature=0.1, num_classes=3)
    for rank in range(2):
        acc, dtype, shape, n_query = torch.load(tmp_path / f"rank{rank}.pt")
        assert acc == single and dtype == torch.bfloat16 and tuple(shape) == (12, 8)   # 2 x 6 rows, one padding
        assert n_query == (4, 3)[rank]
    nb, y = extract_bank(lambda x: x, bank, torch.device("cpu"))
    assert nb.dtype == torch.bfloat16 and len(nb) == 11
    torch.testing.assert_close(knn_votes(nb, y, query.tensors[0], 3, 0.1, 3, block=4),
                               knn_votes(nb, y, query.tensors[0], 3, 0.1, 3))
