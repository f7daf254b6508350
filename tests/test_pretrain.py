"""MAE pretraining runs: stage switches in one process, exact resume, atomic checkpoints, bad
images, non-finite loss, config errors, encoder export, a 2-process gloo run, the demo command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import atomic_save, load_checkpoint
from engine.config import ConfigError, load_config
from engine.demo_data import generate_demo_dataset
from pretrain.config import PretrainConfig
from pretrain.main import main, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=40, size=40, val_fraction=0.0)
    return str(root / "train")


def tiny_overrides(data, out, *extra):
    return [f"data.path={data}", "data.num_workers=0", "data.replay_chunks=2",
            "model.arch=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "curriculum.name=etpp", "curriculum.epochs=1.5",
            "train.batch_size=8", "train.warmup_epochs=0.2", "train.log_every=1", "train.progress=false",
            "train.keep_last=2", "train.device=cpu", f"train.output_dir={out}", *extra]   # CPU numerics


def cfg_for(*overrides):
    return load_config(PretrainConfig, None, list(overrides))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_run_switches_stages_in_process(images, tmp_path):
    out = tmp_path / "run"
    res = run(cfg_for(*tiny_overrides(images, out)))
    plan = json.load(open(out / "plan.json"))
    sizes = [r["size"] for r in plan["rows"]]
    assert sizes == [16] * 2 + [24] * 4 + [32] * 4            # etpp scaled to 32, multiples of 8
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, res["total_steps"] + 1))
    # every step used its stage's size; the LR followed one schedule (single peak, no restart)
    for r in m:
        row = next(x for x in plan["rows"] if x["start_step"] < r["step"] <= x["end_step"])
        assert r["size"] == row["size"]
    lrs = [r["lr"] for r in m]
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    # optimizer state survived every stage change: Adam's step count equals the run's
    ckpt = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {res["total_steps"]}
    assert ckpt["meta"]["img_size"] == 32 and ckpt["meta"]["patch_size"] == 8 and ckpt["meta"]["norm_pix_loss"]
    # outputs a person looks at
    assert (out / "config.yaml").is_file() and (out / "curriculum.png").is_file()
    recon = sorted(os.listdir(out / "reconstructions"))
    assert recon[0] == "stage00_size16.png" and recon[-1] == "stage09_size32.png" and len(recon) == 10
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert len(list((out / "checkpoints").glob("checkpoint-0*.pth"))) == 2   # keep_last=2


def test_resume_continues_exactly(images, tmp_path):
    full = tmp_path / "full"
    run(cfg_for(*tiny_overrides(images, full)))
    part = tmp_path / "part"
    k = 7   # inside stage 1 (not at a boundary)
    run(cfg_for(*tiny_overrides(images, part, f"train.max_steps={k}")))
    assert len(read_metrics(part)) == k
    run(cfg_for(*tiny_overrides(images, part)))                # resume=auto picks checkpoint-latest
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12) and rb["size"] == ra["size"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
    wa = load_checkpoint(str(full / "checkpoints" / "checkpoint-latest.pth"))["model"]
    wb = load_checkpoint(str(part / "checkpoints" / "checkpoint-latest.pth"))["model"]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=1e-5)
    # a different plan cannot silently resume from this run
    with pytest.raises(ConfigError, match="cannot resume"):
        run(cfg_for(*tiny_overrides(images, part, "curriculum.epochs=3")))


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-latest.pth"
    atomic_save({"v": torch.tensor([1.0])}, str(path))

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor([2.0])}, str(path))
    monkeypatch.undo()
    assert load_checkpoint(str(path))["v"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-latest.pth"]       # no temp file left


def test_bad_image_is_skipped_and_counted(images, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(sorted(Path(images).rglob("*.png"))[:16]):
        (data / f"{i:03d}.png").write_bytes(f.read_bytes())
    (data / "005.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="skipping unreadable image .*005.png"):
        res = run(cfg_for(*tiny_overrides(str(data), tmp_path / "run")))
    assert res["step"] == res["total_steps"] and res["bad_samples"] > 0
    assert read_metrics(tmp_path / "run")[-1]["bad_samples"] == res["bad_samples"]


@pytest.mark.parametrize("bad, extra", [
    ("nan", ["train.save_every_steps=2"]),                        # logged every step: caught at once
    ("inf", ["train.log_every=100", "train.save_every_steps=1"]),  # never logged: caught before the next save
])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch, bad, extra):
    from pretrain.task import MAETask

    calls = {"n": 0}
    real = MAETask.loss

    def flaky(self, model, inputs, info):
        calls["n"] += 1
        loss = real(self, model, inputs, info)
        return loss * float(bad) if calls["n"] == 5 else loss

    monkeypatch.setattr(MAETask, "loss", flaky)
    out = tmp_path / "run"
    from engine.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss \({bad}\) at step 4 \(stage 1, input 16.* last good checkpoint"):
        run(cfg_for(*tiny_overrides(images, out, *extra)))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-0*.pth"))
    assert ckpts[-1] == "checkpoint-00000004.pth"            # nothing written for the failed step 5
    assert load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))["step"] == 4
    assert all(torch.isfinite(v).all() for v in load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))["model"].values())


def test_config_errors_are_clear(tmp_path, capsys):
    assert main(["model.target=depth", "data.path=x"]) == 2
    assert "model.target: 'depth' is not allowed; allowed: pixel, norm_pixel, hog" in capsys.readouterr().err
    assert main(["train.batchsize=4", "data.path=x"]) == 2
    assert "unknown key(s) train.batchsize (did you mean train.batch_size?); allowed in train: batch_size," in capsys.readouterr().err
    assert main(["train.batch_size=big", "data.path=x"]) == 2
    assert "train.batch_size: expected an integer, got 'big'" in capsys.readouterr().err
    assert main([f"data.path={tmp_path}/missing"]) == 2
    assert "(data.path) does not exist; allowed: an image folder, a .txt file listing images, or tar shards" \
        in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("_base_: nope.yaml\n")
    assert main(["--config", str(bad)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_text_list_data_and_encoder_export_loads_into_timm(images, tmp_path):
    files = sorted(Path(images).rglob("*.png"))[:12]
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n" + "\n".join(str(f) for f in files) + "\n")
    out = tmp_path / "run"
    res = run(cfg_for(*tiny_overrides(str(lst), out, "model.target=hog", "model.patch_size=16",
                                      "curriculum.multiple_of=16")))
    assert res["step"] == res["total_steps"]
    enc = load_checkpoint(str(out / "encoder.pth"))
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    vit.load_state_dict(enc["model"], strict=True)
    assert enc["meta"]["target"] == "hog" and not any(k.startswith("decoder") for k in enc["model"])


def test_two_process_gloo_run(images, tmp_path):
    """Two ranks: the global batch is split, only rank 0 writes, and the kNN monitor's features
    (extracted by both ranks, each every second image, then gathered) give the numbers a single
    process computes from the saved model."""
    out = tmp_path / "ddp"
    knn = [f"eval.knn.train={images}", f"eval.knn.val={images}", "eval.knn.k=3", "eval.knn.max_train=15",
           "eval.knn.batch_size=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pretrain",
           *tiny_overrides(images, out, "curriculum.epochs=1", "train.device=cpu", *knn)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(out)
    assert m[-1]["step"] == json.load(open(out / "plan.json"))["rows"][-1]["end_step"]
    assert r.stdout.count("run directory:") == 2                    # only rank 0 reports (at start and end)
    assert "global batch 8 = 4 per process x 2 process(es) x 1 accumulation step(s)" in r.stdout
    # 2 ranks x 4 samples per step = the global batch of 8
    ck = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    losses = [r for r in m if "loss" in r]
    assert ck["samples_seen"] == 8 * losses[-1]["step"]
    from engine.knn import KNNConfig, KNNMonitor
    from engine.distributed import DistInfo
    from pretrain.checkpoints import load_mae

    model, _ = load_mae(str(out / "checkpoints" / "checkpoint-latest.pth"))
    mon = KNNMonitor(KNNConfig(train=images, val=images, k=3, max_train=15), 32, DistInfo())
    single = mon(lambda x: model.forward_features(x))
    assert [r["knn_top1"] for r in m if "knn_top1" in r][-1] == pytest.approx(single["top1"], abs=1e-6)


def test_replay_stages_run_and_halve_loader_passes(images, tmp_path):
    cur = tmp_path / "replay.yaml"
    cur.write_text("name: replay\nbudget: compute\nstages:\n"
                   "  - {size: 16, share: 0.5, replay_times: 2, replay_buffer: 4}\n"
                   "  - {size: 32, share: 0.5}\n")
    out = tmp_path / "run"
    res = run(cfg_for(*tiny_overrides(images, out, f"curriculum.name={cur}")))
    rows = json.load(open(out / "plan.json"))["rows"]
    assert rows[0]["replay_times"] == 2 and rows[0]["data_epochs"] == pytest.approx(rows[0]["sample_epochs"] / 2)
    ck = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))
    # stage 0 consumed 4 fresh samples per step (8 / replay 2), stage 1 all 8
    assert ck["samples_seen"] == 4 * rows[0]["steps"] + 8 * rows[1]["steps"]
    assert res["step"] == res["total_steps"]


def test_attention_uses_sdpa():
    from pretrain.models_mae import create_mae

    model = create_mae("mae_vit_tiny_patch16", depth=1, decoder_depth=1)
    assert all(b.attn.fused_attn for b in list(model.blocks) + list(model.decoder_blocks))
