"""The training step and run plumbing: no host sync in steps that do not log (the non-finite
check before every checkpoint is in test_pretrain.py), background checkpoint writes, compile guards,
position tables built at stage start, replay of stage-size float16 inputs, the measured saving,
and the device decode / tar shard data sources inside real pretraining runs."""
import json
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.checkpoint import CheckpointWriter, load_checkpoint
from engine.config import load_config
from engine.demo_data import generate_demo_dataset
from engine.pos_embed import sincos_pos_embed
from engine.trainer import CurriculumTrainer
from pretrain.config import PretrainConfig
from pretrain.main import run
from pretrain.models_mae import create_mae

from test_pretrain import read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=40, size=40, val_fraction=0.0)
    return str(root / "train")


@pytest.fixture(scope="module")
def jpegs(images, tmp_path_factory):
    """The same pictures as JPEGs (what the device decoder takes)."""
    root = tmp_path_factory.mktemp("jpegs")
    for i, f in enumerate(sorted(Path(images).rglob("*.png"))[:24]):
        Image.open(f).convert("RGB").resize((48, 40)).save(root / f"{i:03d}.jpg", quality=90)
    return str(root)


def cfg_for(*overrides):
    return load_config(PretrainConfig, None, list(overrides))


def test_steps_that_do_not_log_never_read_the_device(images, tmp_path, monkeypatch):
    """Every read of a floating-point tensor's value (what would synchronise with a GPU) must
    happen outside ``_train_step``; the loss is read only at log steps and checkpoints."""
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            if self.is_floating_point():
                f = sys._getframe(1)
                while f is not None and f.f_code.co_name != "_train_step":
                    f = f.f_back
                if f is not None:
                    reads.append(name)
            return real(self, *a, **k)
        return wrapped

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    loss_reads = []
    real_read = CurriculumTrainer._read_loss

    def counting(self, reset=True):
        loss_reads.append(self.step)
        return real_read(self, reset)

    monkeypatch.setattr(CurriculumTrainer, "_read_loss", counting)
    res = run(cfg_for(*tiny_overrides(images, tmp_path / "run", "train.log_every=4")))
    assert reads == []
    plan = json.load(open(tmp_path / "run" / "plan.json"))["rows"]
    saves = {r["end_step"] for r in plan}
    logs = {s for s in range(1, res["total_steps"] + 1) if s % 4 == 0}
    assert sorted(set(loss_reads)) == sorted(saves | logs)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == sorted(logs | {res["total_steps"]})


def test_checkpoint_writer_writes_a_snapshot_in_the_background(tmp_path):
    started, release = threading.Event(), threading.Event()
    written = {}

    def slow_write(state):
        started.set()
        release.wait(10)
        written.update(state)

    w = CheckpointWriter()
    t = torch.zeros(3)
    w.submit({"t": t, "meta": {"step": 1}}, slow_write)
    assert started.wait(10) and not written          # submit returned while the write is pending
    t += 5                                           # training goes on changing the live tensor
    release.set()
    w.wait()
    assert torch.equal(written["t"], torch.zeros(3)) and written["meta"] == {"step": 1}

    def broken(state):
        raise OSError("disk full")

    w.submit({"t": t}, broken)
    with pytest.raises(OSError, match="disk full"):
        w.wait()
    w.wait()                                         # reported once


def test_position_tables_are_built_at_stage_start_not_in_forward():
    model = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()
    model.prepare_input_size(16)
    tables = dict(model._grid_pos)
    torch.testing.assert_close(tables[("pos_embed", (2, 2))], sincos_pos_embed(32, (2, 2), (4, 4)))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
        model(torch.randn(2, 3, 24, 24))              # not prepared: computed, not cached
    assert model._grid_pos.keys() == tables.keys()
    assert all(model._grid_pos[k] is v for k, v in tables.items())


def test_compile_uses_static_shapes_and_a_fitting_recompile_limit(images, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    res = run(cfg_for(*tiny_overrides(images, tmp_path / "a", "train.compile=true", "train.compile_backend=eager")))
    assert res["step"] == res["total_steps"]
    assert torch._dynamo.config.recompile_limit >= 3       # etpp here: sizes 16, 24, 32
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"3 distinct \(batch, size\) shapes .* train.compile_recompile_limit=2"):
        run(cfg_for(*tiny_overrides(images, tmp_path / "b", "train.compile=true", "train.compile_backend=eager",
                                    "train.compile_recompile_limit=2", "train.max_steps=1")))
    torch._dynamo.reset()


def test_replay_keeps_stage_size_float16_inputs(images, tmp_path, monkeypatch):
    from efficienttrain.replay import ReplayBuffer

    stored = []
    real = ReplayBuffer._store

    def spy(self, tensors):
        real(self, tensors)
        newest = len(self) - 1
        stored.append([(self.chunk(j, newest).dtype, tuple(self.chunk(j, newest).shape)) for j in range(len(tensors))])

    monkeypatch.setattr(ReplayBuffer, "_store", spy)
    cur = tmp_path / "replay.yaml"
    cur.write_text("name: replay\nbudget: compute\nstages:\n"
                   "  - {size: 16, share: 0.5, replay_times: 2, replay_buffer: 4}\n"
                   "  - {size: 32, share: 0.5}\n")
    run(cfg_for(*tiny_overrides(images, tmp_path / "run", f"curriculum.name={cur}")))
    # loader batch 8 / replay 2 = 4 samples, in 2 chunks of 2: float16 at the stage size 16
    assert stored and all(s == [(torch.float16, (2, 3, 16, 16))] for s in stored)


def test_resume_inside_a_replay_stage_is_exact(images, tmp_path):
    """The buffer is not in the checkpoint: a resumed run re-prepares the loader batches it held."""
    cur = tmp_path / "replay.yaml"
    cur.write_text("name: replay\nbudget: compute\nstages:\n"
                   "  - {size: 16, share: 0.6, replay_times: 4, replay_buffer: 3}\n"
                   "  - {size: 32, share: 0.4}\n")
    ov = [f"curriculum.name={cur}", "curriculum.epochs=3"]
    run(cfg_for(*tiny_overrides(images, tmp_path / "full", *ov)))
    run(cfg_for(*tiny_overrides(images, tmp_path / "part", *ov, "train.max_steps=7", "train.save_every_steps=7")))
    run(cfg_for(*tiny_overrides(images, tmp_path / "part", *ov)))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    plan = json.load(open(tmp_path / "full" / "plan.json"))["rows"]
    assert plan[0]["steps"] > 10                                   # step 7 is inside the replay stage
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-7), ra["step"]


def test_run_reports_measured_against_planned_saving(images, tmp_path, capsys):
    out = tmp_path / "run"
    res = run(cfg_for(*tiny_overrides(images, out, "curriculum.baseline_epochs=3")))
    s = json.load(open(out / "summary.json"))
    assert s == json.loads(json.dumps(res["speed"]))
    assert [r["size"] for r in s["stages"]] == [16] * 2 + [24] * 4 + [32] * 4
    assert sum(r["steps"] for r in s["stages"]) == res["total_steps"]
    assert all(r["images"] == 8 * r["steps"] and r["seconds"] > 0 for r in s["stages"])
    final = [r for r in s["stages"] if r["size"] == 32]
    ips = sum(r["images"] for r in final) / sum(r["seconds"] for r in final)
    assert s["final_size_images_per_s"] == pytest.approx(ips)
    assert s["baseline_seconds_estimate"] == pytest.approx(3 * 40 / ips)            # baseline 3 epochs of 40 images
    assert s["measured_speedup"] == pytest.approx(s["baseline_seconds_estimate"] / s["step_seconds"])
    assert s["planned_speedup"] == pytest.approx(2.0)                               # 3 / 1.5 equivalent epochs
    assert "measured" in capsys.readouterr().out
    # a run stopped before its final-size stage cannot measure the saving, and says so
    run(cfg_for(*tiny_overrides(images, tmp_path / "part", "train.max_steps=3", "curriculum.baseline_epochs=3")))
    assert json.load(open(tmp_path / "part" / "summary.json"))["measured_speedup"] is None
    assert "measured: not available" in capsys.readouterr().out


def test_device_decode_run_resumes_exactly_and_matches_the_cpu_path(jpegs, tmp_path):
    dev = ["data.decode=device"]
    full = run(cfg_for(*tiny_overrides(jpegs, tmp_path / "full", *dev)))
    run(cfg_for(*tiny_overrides(jpegs, tmp_path / "part", *dev, "train.max_steps=5")))
    run(cfg_for(*tiny_overrides(jpegs, tmp_path / "part", *dev)))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), ra["step"]
    assert a[-1]["decode_fallbacks"] == 0 and a[-1]["decode_worker_images"] == 0
    # the CPU path sees the same crops (pixels within one level): the losses agree closely
    cpu = run(cfg_for(*tiny_overrides(jpegs, tmp_path / "cpu", "data.decode=cpu")))
    assert cpu["loss"] == pytest.approx(full["loss"], rel=2e-3)


def test_a_decoder_that_cannot_decode_stops_an_explicit_dali_run(jpegs, tmp_path, monkeypatch, capsys):
    from engine import decode as decode_mod
    from pretrain.main import main

    def no_decoder(self, *args, **kwargs):
        raise RuntimeError("nvJPEG is not available for this device")

    monkeypatch.setattr(decode_mod.DaliDecoder, "_run", no_decoder)
    assert main(tiny_overrides(jpegs, tmp_path / "run", "data.decode=dali")) == 2
    err = capsys.readouterr().err
    assert f"data.decode=dali: DALI {decode_mod.dali_version()} cannot decode JPEGs on cpu: nvJPEG is not available " \
           "for this device; use data.decode=cpu" in err


def test_pretraining_from_tar_shards_equals_the_folder(jpegs, tmp_path):
    from engine.shards import write_shards

    shards = write_shards(jpegs, str(tmp_path / "shards"), max_count=10)
    assert len(shards) == 3
    a = run(cfg_for(*tiny_overrides(jpegs, tmp_path / "folder")))
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    b = run(cfg_for(*tiny_overrides(pattern, tmp_path / "tar", "data.num_workers=2")))
    la, lb = read_metrics(tmp_path / "folder"), read_metrics(tmp_path / "tar")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)
    assert a["step"] == b["step"]


@pytest.mark.parametrize("name", ["mae_vit-b_etpp_400e_replay", "mae_vit-l_etpp_400e_replay"])
def test_shipped_replay_configs_store_what_the_official_code_stores(name):
    """Per process on 8 GPUs: the official DeiT-S / ResNet-50 scripts keep 1920 loader batches of
    128 images at 96 px (stages 0-1) and 256 of 256 at 160 px (stages 2-5), float16."""
    from efficienttrain.curriculum import get_curriculum
    from efficienttrain.replay import buffer_bytes

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(PretrainConfig, root / "configs" / "pretrain" / f"{name}.yaml", ["data.path=x"])
    cur = get_curriculum(cfg.curriculum.name, cfg.model.img_size, cfg.model.patch)
    plan = cur.plan(cfg.curriculum.epochs, 1_281_167, cfg.train.batch_size, cfg.train.accum_steps)
    official = {96: 1920 * 128 * 3 * 96 * 96 * 2, 160: 256 * 256 * 3 * 160 * 160 * 2}
    ours = {}
    for ps in plan.stages:
        rt = ps.stage.replay_times
        assert rt == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1][ps.index]
        if rt > 1:
            ours[ps.stage.size] = buffer_bytes(ps.stage.replay_buffer, ps.loader_batch_size // 8,
                                               (3, ps.stage.size, ps.stage.size))
    assert ours == official
    assert sum(p.data_epochs for p in plan.stages) == pytest.approx(425.69, abs=0.01)   # vs 909 without replay
