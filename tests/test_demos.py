"""The README's main-job command and the fine-tuning demo, as a user runs them (outputs redirected
to a temporary folder): pretrain the demo MAE, then fine-tune its encoder on the demo set."""
import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(script, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(ROOT / "tools" / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=1200, env=env)


def test_pretrain_then_finetune_demo(tmp_path):
    data, pre, ft = tmp_path / "data", tmp_path / "demo", tmp_path / "ft"
    # called from another folder with relative paths: they are the caller's, as with python -m pretrain
    r = sh("pretrain.sh", "train.output_dir=demo", "data.path=data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [line for line in r.stdout.splitlines() if not line.startswith("[setup]")]
    assert printed[0] == f"run directory: {pre}"                         # said first, and again at the end
    assert f"run directory: {pre}" in r.stdout.splitlines()[-1]
    log = (pre / "log.txt").read_text()                                # everything printed, kept in the run
    assert "total: " in log and "optimizer steps" in log and "exported to" in log and "\r" not in log
    header = (pre / "config.yaml").read_text().splitlines()[:2]
    assert header[0] == "# command: python -m pretrain --config " + str(ROOT / "configs/pretrain/demo.yaml") \
        + f" train.output_dir=demo data.path=data  (in {tmp_path})"
    assert re.fullmatch(r"# git: ([0-9a-f]{40}(\+dirty)?|unknown .*)", header[1]), header[1]
    with open(pre / "metrics.jsonl") as f:
        m = [json.loads(line) for line in f]
    losses = [r for r in m if "loss" in r]
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]                # it learned something
    knn = [r["knn_top1"] for r in m if "knn_top1" in r]
    # every stage end; 4 classes (chance 25 %), a random encoder scores about 78 %, the trained demo 90 %
    assert len(knn) == 10 and knn[-1] > 84.0
    assert len(os.listdir(pre / "reconstructions")) == 10 and (pre / "curriculum.png").is_file()

    # model.name / img_size / kwargs come from the encoder's metadata (the demo config leaves them at auto)
    r = sh("finetune.sh", f"model.checkpoint={pre / 'encoder.pth'}", f"data.path={data}", f"train.output_dir={ft}",
           "train.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "architecture from " in r.stdout and "model.name=vit_tiny_patch16_224 model.kwargs={'patch_size': 4, " \
        "'depth': 4} model.img_size=48" in r.stdout
    top1 = float(re.search(r"validation at 48px: top-1 ([\d.]+)%", r.stdout).group(1))
    assert top1 > 50.0, r.stdout[-2000:]                                 # 4 classes: chance is 25 %
    assert (ft / "checkpoints" / "checkpoint-best.pth").is_file()


def test_wrapper_help_sets_nothing_up_and_lists_options(tmp_path):
    """--help shows the wrapper's own options and every config section, and runs nothing (in a fresh
    clone, tools/finetune.sh --help must not start the pretraining demo)."""
    for script, module in (("pretrain.sh", "pretrain"), ("finetune.sh", "finetune")):
        r = sh(script, "--help", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "--nproc" in r.stdout and f"usage: python -m {module}" in r.stdout
        assert "  train: batch_size, per_gpu_batch_size" in r.stdout and "docs/config.md" in r.stdout
        assert "running the pretraining demo" not in r.stdout and not (tmp_path / "runs").exists()
        assert "[setup]" not in r.stdout + r.stderr                     # nothing was set up either
    # --config FILE as python -m takes it (no demo pretraining first), --dry-run writes nothing
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("mode: train\nmodel: {name: resnet10t, num_classes: 4}\ndata: {path: nowhere}\n")
    r = sh("finetune.sh", "--config", "ft.yaml", "--print-config", cwd=tmp_path)
    assert r.returncode == 0 and "name: resnet10t" in r.stdout, r.stderr[-2000:]
    assert "running the pretraining demo" not in r.stdout and not (tmp_path / "runs").exists()
    r = sh("pretrain.sh", "--nproc", "two", cwd=tmp_path)
    assert r.returncode == 2 and "--nproc must be a positive number of processes, got 'two'" in r.stderr
