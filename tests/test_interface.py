"""The seams a user touches: one override style (key=value) on every ``python -m`` entry point,
``python -m evaluation``'s progress and its run-directory errors, one ETA and no bar redraws in a
redirected log, savings worded the right way round (and none for a run that plans none), the
search's keys in its ``--help``, and the public data sets the shipped configs name."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import engine.trainer as trainer_mod
import evaluation.run_eval as run_eval
from engine.config import ConfigError, load_config
from engine.demo_data import generate_demo_dataset
from engine.flops import format_savings
from engine.speed import format_saving, nothing_planned, times
from pretrain.config import PretrainConfig
from pretrain.main import run

from test_pretrain import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(*overrides):
    return load_config(PretrainConfig, None, list(overrides))


def summary(planned, measured, **extra):
    """A speed summary as engine.speed.measured_saving writes it."""
    base = 100.0
    return {"stages": [{"stage": 0, "size": 32, "steps": 10, "images": 80, "seconds": 2.0, "images_per_s": 40.0}],
            "step_seconds": base / measured if measured else 2.0, "overhead_seconds": 0.5,
            "stage_start_seconds": 0.0, "stage_starts_measured": False, "planned_speedup": planned,
            "baseline_epochs": 3.0, "final_size_images_per_s": 40.0,
            "baseline_seconds_estimate": base if measured else None, "measured_speedup": measured,
            "measured_over_planned": measured / planned if measured else None, "wall_efficiency": {}, **extra}


# ---- savings worded the right way round ----------------------------------------------------------
def test_a_slower_run_reads_more_wall_time_not_a_fraction_less():
    assert times(2.5, "compute") == "2.50x less compute"
    assert times(0.91, "wall time") == "1.10x more wall time"
    assert times(1.001, "wall time") == "the same wall time (1.00x)"
    text = format_saving(summary(2.0, 0.91))
    assert "measured 1.10x more wall time" in text and "0.91x less" not in text
    assert "planned 2.00x less compute than 3 epochs" in text
    assert "measured 2.28x less wall time" in format_saving(summary(2.5, 2.28))
    # a plan that costs more than its baseline says so too
    assert "planned 1.25x more compute" in format_saving(summary(0.8, 0.75))


def test_runs_that_plan_no_saving_print_the_throughput_only():
    assert nothing_planned(1.0) and nothing_planned(1.004) and not nothing_planned(1.5)
    for measured in (0.97, None):
        text = format_saving(summary(1.0, measured))
        assert text.startswith("throughput: 32px 40 img/s") and "saving" not in text and "1.00x" not in text
    # a curriculum at the baseline's compute still says what it measured against the baseline
    two = summary(1.0, 0.91, stages=[{"stage": 0, "size": 16, "steps": 4, "images": 32, "seconds": 0.4},
                                     {"stage": 1, "size": 32, "steps": 6, "images": 48, "seconds": 1.2}])
    assert "saving: planned the same compute as 3 epochs at the final size; measured 1.10x more wall time: " \
        in format_saving(two)
    assert format_savings({"pixel_saving": 1.0, "flops_saving": 1.0, "flops_ratio": {}}, 300, "MAE") == []
    lines = format_savings({"pixel_saving": 4.0, "flops_saving": 4.0, "flops_ratio": {}}, 1600, "MAE")
    assert len(lines) == 1 and "4.00x by pixel cost" in lines[0]        # fewer epochs than the baseline: kept
    lines = format_savings({"pixel_saving": 1.0, "flops_saving": 0.91, "flops_ratio": {"16": 0.3, "32": 1.0}}, 3, "MAE")
    assert "1.00x by pixel cost (B^2), 1.10x more compute by MAE's training FLOPs" in lines[0]


# ---- progress: plain lines off a terminal, one ETA on it -------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled demo set: train/ and val/ with 4 classes."""
    root = tmp_path_factory.mktemp("labelled") / "set"
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def test_a_redirected_run_logs_periodic_lines_and_no_bar(folder, tmp_path, capsys, monkeypatch):
    train = os.path.join(folder, "train")
    monkeypatch.setattr(trainer_mod, "PLAIN_PROGRESS_SECONDS", 0.0)      # a line at every log step
    res = run(cfg_for(*tiny_overrides(train, tmp_path / "plain", "train.progress=true", "train.log_every=2")))
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("progress: ")]
    total = res["total_steps"]
    assert [ln.split()[2] for ln in lines] == [f"{s}/{total}" for s in sorted({*range(2, total + 1, 2), total})]
    assert all(ln.count("eta") == 1 and "img/s" in ln and "loss" in ln for ln in lines)
    assert "\r" not in out and "\r" not in err and "it/s" not in err          # no tqdm redraws
    log = (tmp_path / "plain" / "log.txt").read_text()
    assert "\r" not in log and log.count("progress: step ") == len(lines)
    # at the default interval a short run says where it is at its first log step and its last
    monkeypatch.setattr(trainer_mod, "PLAIN_PROGRESS_SECONDS", 30.0)
    run(cfg_for(*tiny_overrides(train, tmp_path / "default", "train.progress=true", "train.log_every=2")))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("progress: ")]
    assert [ln.split()[2] for ln in lines] == [f"2/{total}", f"{total}/{total}"]
    # train.progress=false: neither lines nor a bar
    run(cfg_for(*tiny_overrides(train, tmp_path / "quiet", "train.progress=false")))
    out, err = capsys.readouterr()
    assert "progress: " not in out and "\r" not in err


def test_the_bar_on_a_terminal_shows_one_eta(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_mod, "on_terminal", lambda stream=None: True)
    run(cfg_for(*tiny_overrides(os.path.join(folder, "train"), tmp_path / "tty", "train.progress=true")))
    out, err = capsys.readouterr()
    redraws = [r for r in err.split("\r") if "step" in r and "|" in r]
    assert redraws and "progress: " not in out
    assert all("<" not in r for r in redraws)                          # tqdm's own remaining time is gone
    last = redraws[-1]
    assert last.count("eta") == 1 and ("step/s" in last or "s/step" in last), last
    assert "\r" not in (tmp_path / "tty" / "log.txt").read_text()     # the run's log keeps no redraws
    monkeypatch.undo()
    assert trainer_mod.on_terminal(io.StringIO()) is False              # the real check: a StringIO is no terminal


def test_a_run_without_a_curriculum_prints_no_saving(folder, tmp_path, capsys):
    run(cfg_for(*tiny_overrides(os.path.join(folder, "train"), tmp_path / "base", "curriculum.name=baseline",
                                "curriculum.epochs=1")))
    out = capsys.readouterr().out
    assert "throughput: 32px" in out
    assert "saving:" not in out and "planned saving" not in out and "1.00x" not in out and "less compute" not in out


# ---- python -m evaluation: key=value, progress, clear errors ---------------------------------------
@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    run(cfg_for(*tiny_overrides(os.path.join(folder, "train"), out)))
    return out


def test_evaluation_takes_key_value_settings_and_says_how_far_it_is(finished, folder, capsys, monkeypatch):
    monkeypatch.setattr(run_eval, "PROGRESS_SECONDS", 0.0)               # every batch / epoch reports
    assert run_eval.main([str(finished), f"data={folder}", "knn.k=3", "probe.epochs=3", "batch_size=8"]) == 0
    out = capsys.readouterr().out
    res = json.load(open(finished / "evaluation.json"))
    assert res["knn"]["k"] == 3 and res["probe"]["epochs"] == 3
    assert "scoring the weighted kNN rule (k 3, temperature 0.07)" in out
    for phase in ("loading the encoder", "extracting features of the 36 training images",
                  "training features: 8/36 images", "validation features: 12 images in",
                  "training a linear probe for 3 epochs", "linear probe: 1/3 epochs", "knn: top-1 ", "probe: top-1 "):
        assert phase in out, phase
    # the --flags are aliases of the keys; a key=value given as well wins
    assert run_eval.evaluation_config([], {"k": 5, "no_probe": True, "data": folder}) == \
        run_eval.evaluation_config([f"data={folder}", "knn.k=5", "probe=false"])
    assert run_eval.evaluation_config(["knn.k=7"], {"k": 5}).knn.k == 7
    cfg = run_eval.evaluation_config(["finetune=2", "finetune.overrides=[train.lr=1e-4]"], {},
                                     ["train.batch_size=8"])
    assert cfg.finetune.epochs == 2.0 and cfg.finetune.overrides == ["train.lr=1e-4", "train.batch_size=8"]
    with pytest.raises(ConfigError, match="unknown key"):
        run_eval.evaluation_config(["knn.kk=3"])
    assert run_eval.main([str(finished), "--data", folder, "--k", "4", "--no-probe", "--batch-size", "8"]) == 0
    assert json.load(open(finished / "evaluation.json"))["knn"]["k"] == 4


def test_evaluation_help_lists_the_keys():
    r = subprocess.run([sys.executable, "-m", "evaluation", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("knn.k=20", "knn.temperature=0.07", "probe.epochs=100", "finetune.epochs=0.0", "data=null",
                "--k (knn.k)", "--data (data)"):
        assert key in r.stdout, key


def test_evaluation_names_what_is_wrong_with_the_run_directory(finished, tmp_path, capsys):
    def error(path):
        assert run_eval.main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: ")
        return err

    assert error(tmp_path / "nowhere") == (f"error: run directory {tmp_path / 'nowhere'} does not exist: give the "
                                           "folder of a pretraining run (the train.output_dir of python -m pretrain, "
                                           "e.g. runs/demo)")
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.yaml").write_text(yaml.safe_dump({"mode": "finetune", "model": {
        "name": "vit_base_patch16_224", "num_classes": 4, "checkpoint": str(finished / "encoder.pth")}}))
    err = error(ft)
    assert f"{ft} is a fine-tuning run (python -m finetune), not a pretraining run" in err
    assert f"python -m evaluation {finished}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a pretraining run directory: it holds neither encoder.pth nor config.yaml" in error(empty)
    assert "is a file, not a run directory" in error(finished / "encoder.pth")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished / "config.yaml").read_text())
    assert "the pretraining run has not finished" in error(unfinished)
    # the dry run says the same
    assert run_eval.main([str(ft), "--dry-run"]) == 2
    assert "is a fine-tuning run" in capsys.readouterr().err


# ---- one override style on every entry point; the search's keys -------------------------------------
def test_curriculum_show_takes_key_value_like_its_flags():
    def show(*args, module="efficienttrain"):
        r = subprocess.run([sys.executable, "-m", module, "show", *args], cwd=ROOT, capture_output=True, text=True)
        return r.returncode, r.stdout, r.stderr

    flags = show("etpp", "--epochs", "100", "--final-size", "128", "--json")
    keys = show("etpp", "epochs=100", "final_size=128", "json=true")
    assert flags[0] == 0 and flags[:2] == keys[:2]
    assert show("etpp", "epochs=100", "final_size=128", "json=true", module="evaluation.curriculum")[:2] == keys[:2]
    rc, _, err = show("etpp", "epoch=100")
    assert rc == 2 and "'epoch=100' is not a setting of show" in err and "epochs" in err
    rc, _, err = show("etpp", "model=resnet18")                     # the library sends model= to the driver
    assert rc == 2 and "python -m evaluation.curriculum show etpp model=resnet18" in err


def test_search_help_lists_the_proxy_keys_with_defaults_and_meaning():
    r = subprocess.run([sys.executable, "-m", "evaluation.curriculum", "search", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0
    from engine.config_doc import describe
    from evaluation.search_runner import ProxyConfig

    for d in describe(ProxyConfig):
        line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith(f"{d.key}={d.default}")), None)
        assert line is not None, d.key
        assert not d.help or d.help.split()[0] in line, d.key
    assert "search_runner.py" not in r.stdout


# ---- public data sets: named in the configs and in the error ---------------------------------------
DATASET_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.yaml")
                         if "imagenette" in p.name or "../shared/datasets" in p.read_text())


def _data_path(cfg):
    return cfg.get("data") if isinstance(cfg.get("data"), str) else (cfg.get("data") or {}).get("path")


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_configs_needing_a_public_data_set_name_it_where_to_get_it_and_the_folder(name):
    text = (ROOT / name).read_text()
    header = "\n".join(ln for ln in text.splitlines()[:8] if ln.startswith("#"))
    path = _data_path(yaml.safe_load(text))
    root = path[:-len("/train")] if path.endswith("/train") else path
    assert "Imagenette2" in header and "https://github.com/fastai/imagenette" in header
    assert root in header and "train/" in header and "val/" in header


@pytest.mark.parametrize("name", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.yaml")
                                        if "/path/to/imagenet" in p.read_text()))
def test_imagenet_configs_name_the_set_and_where_to_get_it(name):
    header = "\n".join(ln for ln in (ROOT / name).read_text().splitlines()[:4] if ln.startswith("#"))
    assert "ImageNet-1K" in header and "https://image-net.org/download.php" in header and "data" in header


def test_a_missing_public_data_set_says_what_it_is_and_where_to_get_it(tmp_path, capsys):
    from pretrain.main import main

    missing = tmp_path / "shared" / "datasets" / "imagenette-112"
    assert main(["--config", str(ROOT / "configs/pretrain/imagenette64_vit-t.yaml"), f"data.path={missing}/train",
                 f"train.output_dir={tmp_path / 'run'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Imagenette2" in err and "https://github.com/fastai/imagenette" in err
    assert f"so that {missing} holds train/ and val/" in err
    from engine.data import image_folder

    with pytest.raises(FileNotFoundError, match="image-net.org"):
        image_folder("/path/to/imagenet/val")
    with pytest.raises(FileNotFoundError) as e:
        image_folder(str(tmp_path / "mine" / "val"))
    assert "expects" not in str(e.value)                                 # any other folder: no guess
