"""`python -m efficienttrain` as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "efficienttrain", *args], cwd=ROOT, capture_output=True, text=True)


def test_show_text_table_et():
    r = run("show", "et", "--epochs", "300")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[2].split() == ["0", "160", "0.0-5.4", "0.600", "1", "180.00", "0.00", "180.00"]
    assert lines[4].split()[1] == "224" and lines[4].split()[-1] == "300.00"
    assert "speedup vs baseline 300 epochs: 1.53x" in r.stdout


def test_show_json_etpp_and_plot(tmp_path):
    png = tmp_path / "etpp.png"
    r = run("show", "etpp", "--epochs", "200", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["budget"] == "compute" and data["speedup"] == pytest.approx(1.5)
    assert [row["size"] for row in data["table"]] == [96] * 2 + [160] * 4 + [224] * 4
    assert data["table"][0]["data_epochs"] == pytest.approx(20 * (224 / 96) ** 2)
    assert data["table"][-1]["data_epoch_end"] == pytest.approx(sum(row["data_epochs"] for row in data["table"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_show_final_size_and_multiple_of():
    r = run("show", "etpp", "--final-size", "112", "--multiple-of", "8", "--json")
    assert [row["size"] for row in json.loads(r.stdout)["table"]][:3] == [48, 48, 80]


def test_list_and_errors():
    r = run("list")
    assert r.returncode == 0 and {line.split()[0] for line in r.stdout.splitlines()} >= {"baseline", "et", "etpp", "etpp-deit", "etpp-convnext", "linear"}
    r = run("show", "nope")
    assert r.returncode == 2 and "unknown curriculum 'nope'; allowed: baseline, et" in r.stderr
    r = run("show", "et", "--final-size", "200", "--multiple-of", "32")
    assert r.returncode == 2 and "not a multiple of multiple_of=32" in r.stderr



def test_commands_needing_the_engine_point_to_the_driver():
    """The library's CLI imports nothing above it: ``search`` and ``show --model`` live in the driver
    (python -m evaluation.curriculum); asked here they name it and exit 2 without importing the engine."""
    for args, why in ((["search", "configs/search/demo_etpp.yaml", "budget=8"], "trains proxy models"),
                      (["show", "etpp", "--model", "resnet18"], "builds it with the training engine"),
                      (["show", "etpp", "--model=resnet18"], "builds it with the training engine")):
        r = run(*args)
        assert r.returncode == 2 and r.stdout == "" and why in r.stderr, r.stderr
        assert f"python -m evaluation.curriculum {' '.join(args)}" in r.stderr
    probe = ("import sys; from efficienttrain.__main__ import main; assert main(['show', 'et']) == 0; "
             "assert main(['search', 'x.yaml']) == 2; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('engine', 'evaluation', 'pretrain', "
             "'finetune', 'detection')))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stderr


def test_driver_lists_and_shows_as_the_library_does():
    driver = [sys.executable, "-m", "evaluation.curriculum"]
    for args in (["list"], ["show", "etpp", "--epochs", "200", "--json"]):
        r = subprocess.run(driver + args, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == run(*args).stdout, r.stderr
    r = subprocess.run(driver + ["search", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "proxy YAML" in r.stdout

def test_yaml_words_stay_words_and_booleans_take_yes_no(tmp_path):
    # YAML 1.1 reads off / no as false: train.amp=off must stay the word, and a file's `amp: off` too
    from engine.config import load_config
    from finetune.config import FinetuneConfig

    f = tmp_path / "c.yaml"
    f.write_text("mode: train\ndata: {path: x}\nmodel: {name: resnet10t}\ntrain: {amp: off, compile: yes}\n")
    cfg = load_config(FinetuneConfig, str(f))
    assert cfg.train.amp == "off" and cfg.train.compile is True
    cfg = load_config(FinetuneConfig, str(f), ["train.amp=bf16", "train.compile=off", "train.progress=No"])
    assert cfg.train.amp == "bf16" and cfg.train.compile is False and cfg.train.progress is False
