"""The README's main-job command and the fine-tuning demo, as a user runs them (outputs redirected
to a temporary folder): pretrain the demo MAE, then fine-tune its encoder on the demo set."""
import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(script, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(ROOT / "tools" / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env=env)


def test_pretrain_then_finetune_demo(tmp_path):
    data, pre, ft = tmp_path / "data", tmp_path / "demo", tmp_path / "ft"
    r = sh("pretrain.sh", f"train.output_dir={pre}", f"data.path={data}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run directory: {pre}" in r.stdout
    with open(pre / "metrics.jsonl") as f:
        m = [json.loads(line) for line in f]
    losses = [r for r in m if "loss" in r]
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]                # it learned something
    knn = [r["knn_top1"] for r in m if "knn_top1" in r]
    # every stage end; 4 classes (chance 25 %), a random encoder scores about 78 %, the trained demo 90 %
    assert len(knn) == 10 and knn[-1] > 84.0
    assert len(os.listdir(pre / "reconstructions")) == 10 and (pre / "curriculum.png").is_file()

    r = sh("finetune.sh", f"model.checkpoint={pre / 'encoder.pth'}", f"data.path={data}", f"train.output_dir={ft}",
           "train.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    top1 = float(re.search(r"validation at 48px: top-1 ([\d.]+)%", r.stdout).group(1))
    assert top1 > 50.0, r.stdout[-2000:]                                 # 4 classes: chance is 25 %
    assert (ft / "checkpoints" / "checkpoint-best.pth").is_file()
