"""tools/visualize_mae.py on our and official-format checkpoints; the benchmark scripts run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.checkpoints import infer_mae_kwargs
from pretrain.models_mae import create_mae

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def tool(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_visualize_official_format_and_errors(tmp_path):
    model = create_mae("mae_vit_base_patch16", **TINY)
    official = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": model.state_dict()}, official)          # the official release layout: no metadata
    kw = infer_mae_kwargs(model.state_dict())
    assert (kw["img_size"], kw["patch_size"], kw["embed_dim"], kw["depth"], kw["decoder_depth"]) == (32, 16, 64, 1, 1)
    img = tmp_path / "a.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    out = tmp_path / "grid.png"
    r = tool("tools/visualize_mae.py", official, img, img, "--out", out)
    assert r.returncode == 0, r.stderr
    grid = Image.open(out)
    assert grid.size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)           # 4 columns x 2 images, 2-px padding
    enc = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask"))}}, enc)
    r = tool("tools/visualize_mae.py", enc, img)
    assert r.returncode == 2 and "has no decoder" in r.stderr
    r = tool("tools/visualize_mae.py", official, img, "--size", "20")
    assert r.returncode == 2 and "multiple of the patch size 16" in r.stderr


def test_benchmark_pretrain_runs_every_stage_size(tmp_path):
    r = tool("tools/benchmark_pretrain.py", "--arch", "mae_vit_tiny_patch16", "--img-size", "32", "--patch-size", "8",
             "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(next(tmp_path.glob("pretrain_*.json")).read_text())
    assert [row["size"] for row in res["rows"]] == [16, 24, 32]
    assert all(row["train_images_per_s"] > 0 and 0 < row["crop_share"] for row in res["rows"])


def test_benchmark_data_reports_both_paths(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.jpg", quality=90)
    Image.fromarray(arr).save(tmp_path / "x.png")
    r = tool("tools/benchmark_data.py", tmp_path, "--size", "32", "--images", "7", "--batch", "4", "--json",
             "--archs", "mae_vit_tiny_patch16")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    cpu, dev = res["paths"]["cpu"], res["paths"]["dali"]
    assert cpu["worker_ms_per_image"] > 0 and dev["worker_ms_per_image"] > 0
    assert res["worker_cost_ratio_cpu_over_dali"] == cpu["worker_ms_per_image"] / dev["worker_ms_per_image"]
    assert dev["training_process"]["worker_decoded"] >= 1          # the PNG took the CPU path in the worker
    rows = res["cores_per_gpu"]
    assert [row["size"] for row in rows] == [16, 32]              # etpp sizes at final 32, patch 16
    for row in rows:
        ips = res["mfu"] * res["peak_tflops"] * 1e12 / (row["train_gflop_per_image"] * 1e9)
        assert row["gpu_images_per_s_estimate"] == ips
        assert row["cores_per_gpu"]["cpu"] == ips * cpu["worker_ms_per_image"] / 1e3
    r = tool("tools/benchmark_data.py", tmp_path / "missing")
    assert r.returncode == 2 and "error:" in r.stderr


def test_wrappers_check_the_config_before_torchrun(tmp_path):
    # under --nproc > 1 a config mistake must end with exit 2 and the message, not torchrun's report
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", "tools/pretrain.sh", "configs/pretrain/demo.yaml", "--nproc", "2", "train.blr=-1",
                        f"train.output_dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: train.blr must be > 0, got -1.0" in r.stderr and "torchrun" not in r.stderr.lower()
    assert not any(tmp_path.iterdir())                          # nothing started


def test_gpu_check_runs_its_checks_on_a_cpu():
    """tools/gpu_check.py --device cpu --tiny: every check of the GPU acceptance run, on DALI's CPU
    backend, so the script cannot rot between GPU runs."""
    r = tool("tools/gpu_check.py", "--device", "cpu", "--tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] is True and res["dali"].startswith("2.4.0")
    assert res["pixels_vs_pil"]["mean"] <= 2 and res["pixels_vs_pil"]["images"] == 48
    assert res["fft_crop_max_error"] < 1e-3 and res["replay_round_trip"]["exact"]
    assert set(res["end_to_end"]["images_per_s"]) == set(res["model_only"]["images_per_s"]) == {"16", "24", "32"}
    assert res["wall_efficiency"]["model_only"]["32"] == 1.0 and res["host_syncs_per_step"] is None
    assert "decode on dali" in res["end_to_end"]["decode"]


def test_benchmark_cpu_load_reports_idle_and_busy_throughput(tmp_path):
    out = tmp_path / "load.json"
    r = tool("tools/benchmark_cpu_load.py", "--steps", "11", "--settings", "threads-1", "--data", tmp_path / "demo",
             "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())["results"]["threads-1"]
    assert rep["idle_img_s"] > 0 and rep["busy_img_s"] > 0
    assert rep["busy_over_idle"] == pytest.approx(rep["busy_img_s"] / rep["idle_img_s"])
    bad = tool("tools/benchmark_cpu_load.py", "--settings", "fastest")
    assert bad.returncode == 2 and "allowed: torch-default" in bad.stderr
