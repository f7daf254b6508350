"""tools/visualize_mae.py on our and official-format checkpoints; the benchmark scripts run."""
import json
import subprocess
import sys
from pathlib import Path

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
