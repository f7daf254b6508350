"""Weight EMA (train.ema_decay): the update against its closed form (parameters and buffers, a DDP
wrapper), the config check, checkpoints (model_ema, checkpoint-best-ema.pth evaluated by mode=eval),
an exactly resumed run, and the EMA across model.resize=official stage changes (interpolated
like the model, the reference written out here from the official update_ckpt)."""
import json
import socket

import pytest
import timm
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config
from engine.demo_data import generate_demo_dataset
from engine.ema import WeightEma
from finetune.config import FinetuneConfig
from finetune.main import run


class One(nn.Module):
    """One parameter, one float buffer, one integer buffer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0], dtype=dtype))
        self.register_buffer("b", torch.tensor([10.0], dtype=dtype))
        self.register_buffer("n", torch.tensor(0, dtype=torch.int64))


def _set(model, w, b, n):
    with torch.no_grad():
        model.w.fill_(w)
        model.b.fill_(b)
        model.n.fill_(n)


def test_update_is_the_closed_form_for_parameters_and_buffers():
    d = 0.9
    model = One()
    ema = WeightEma(model, d)
    _set(model, 3.0, 4.0, 5)
    ema.update(model)
    _set(model, -2.0, 0.5, 7)
    ema.update(model)
    # two updates from e0: d^2 e0 + d (1 - d) m1 + (1 - d) m2
    assert ema.module.w.item() == pytest.approx(d * d * 1.0 + d * (1 - d) * 3.0 + (1 - d) * -2.0, rel=1e-6)
    assert ema.module.b.item() == pytest.approx(d * d * 10.0 + d * (1 - d) * 4.0 + (1 - d) * 0.5, rel=1e-6)
    assert ema.module.n.item() == 7                              # integer buffers are copied
    assert model.w.item() == -2.0 and not ema.module.w.requires_grad
    # a bfloat16 model gets a float32 EMA (bfloat16 cannot hold (1 - d) * (m - e) steps)
    low = One(torch.bfloat16)
    assert WeightEma(low, d).module.w.dtype == torch.float32
    # state dict round trip, strict
    other = WeightEma(One(), d)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values()))
    with pytest.raises(RuntimeError):
        other.load_state_dict({"w": torch.zeros(1)})
    with pytest.raises(ValueError):
        WeightEma(model, 1.0)


def test_batchnorm_statistics_are_averaged_like_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    d = 0.8
    ema = WeightEma(model, d)
    ref = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        model(torch.randn(16, 3) * 3 + 1)                      # moves running_mean / running_var
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        ema.update(model)
        for k in ref:
            ref[k] = d * ref[k] + (1 - d) * model.state_dict()[k].double()
    got = ema.state_dict()
    for k in ("1.running_mean", "1.running_var", "0.weight", "1.weight"):
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got["1.running_var"], model[1].running_var)
    assert got["1.num_batches_tracked"].item() == 3


def test_a_ddp_wrapped_model_is_averaged_as_its_module():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = One()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema, plain = WeightEma(ddp, 0.5), WeightEma(model, 0.5)
        assert list(ema.state_dict()) == ["w", "b", "n"]        # no "module." prefix: loads into the bare model
        _set(model, 3.0, 2.0, 1)
        ema.update(ddp)
        plain.update(model)
        assert ema.module.w.item() == plain.module.w.item() == 2.0 and ema.module.b.item() == 6.0
    finally:
        ddp = None                     # as engine.distributed.cleanup: wrapper released, gloo's threads idle
        tdist.barrier()
        tdist.destroy_process_group()


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "1.5"])
def test_bad_decay_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be 0 \(no weight EMA\) or in \(0, 1\)"):
        load_config(FinetuneConfig, None, ["data.path=x", "mode=train", "model.name=resnet10t", f"train.ema_decay={bad}"])


# ---- whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


def base(data, out, *more):
    return [f"data.path={data}", "data.num_workers=0", "mode=train", "model.num_classes=4", "model.drop_path=0.0",
            "curriculum.epochs=2", "train.batch_size=8", "train.warmup_epochs=0.2", "train.progress=false",
            "train.log_every=1", f"train.output_dir={out}", "train.device=cpu", "train.save_every_steps=1", "train.keep_last=0", *more]


def ckpts(out, steps):
    return {s: load_checkpoint(str(out / "checkpoints" / f"checkpoint-{s:08d}.pth")) for s in steps}


def test_run_keeps_model_ema_in_checkpoints_and_the_best_ema_file_evaluates(data, tmp_path, capsys):
    d, out = 0.9, tmp_path / "bn"
    # a ConvNet with BatchNorm, two micro-steps per optimizer step, a checkpoint every step
    res = run(load_config(FinetuneConfig, None, base(data, out, "model.name=test_resnet", "model.img_size=32",
                                                     "train.accum_steps=2", f"train.ema_decay={d}")))
    assert "EMA of weights: decay 0.9, evaluated: yes" in capsys.readouterr().out
    n = res["step"]
    ck = ckpts(out, range(1, n + 1))
    for s in range(2, n + 1):          # one update per optimizer step: ema_s = d ema_(s-1) + (1 - d) model_s
        prev, cur = ck[s - 1]["model_ema"], ck[s]
        assert list(cur["model_ema"]) == list(cur["model"])
        for k, v in cur["model_ema"].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, d * prev[k] + (1 - d) * cur["model"][k], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(v, cur["model"][k])         # num_batches_tracked
    assert not torch.allclose(ck[n]["model_ema"]["fc.weight"], ck[n]["model"]["fc.weight"])
    # checkpoint-best-ema.pth: the EMA weights of its step under "model", marked, not resumable
    best = load_checkpoint(str(out / "checkpoints" / "checkpoint-best-ema.pth"))
    assert best["meta"]["weights"] == "ema" and best["meta"]["ema_decay"] == d and "optimizer" not in best
    same = ck[best["step"]]["model_ema"]
    assert list(best["model"]) == list(same) and all(torch.equal(best["model"][k], same[k]) for k in same)
    assert best["best_ema"] == res["best_ema"] == ck[n]["best_ema"]
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval_top1"' in line]
    assert evals and all("eval_ema_top1" in r for r in evals)
    assert max(r["eval_ema_top1"] for r in evals) == res["best_ema"]
    assert json.load(open(out / "summary.json"))["best_ema"] == res["best_ema"]
    # mode=eval on it evaluates the EMA weights directly
    ev = run(load_config(FinetuneConfig, None, base(data, tmp_path / "ev", "model.name=test_resnet", "model.img_size=32",
                                                    "mode=eval", f"model.checkpoint={out / 'checkpoints' / 'checkpoint-best-ema.pth'}")))
    assert ev["eval"]["top1"] == pytest.approx(best["best_ema"])
    # ema_eval=false: the EMA is kept in checkpoints but not evaluated
    quiet = tmp_path / "quiet"
    res = run(load_config(FinetuneConfig, None, base(data, quiet, "model.name=test_resnet", "model.img_size=32",
                                                     "train.max_steps=2", f"train.ema_decay={d}", "train.ema_eval=false")))
    assert "model_ema" in load_checkpoint(str(quiet / "checkpoints" / "checkpoint-latest.pth"))
    assert not (quiet / "checkpoints" / "checkpoint-best-ema.pth").exists() and res["eval_ema"] == {}
    assert "evaluated: no" in capsys.readouterr().out


def official_pos_embed(t, new_grid):
    """utils_buffer.py update_ckpt, DeiT branch (for model and model_ema alike): the class token
    kept, the grid part bilinearly interpolated (align_corners=False)."""
    cls, grid = t[:, :1], t[:, 1:]
    old = int(round(grid.shape[1] ** 0.5))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1)], dim=1)


DEIT = ["model.name=deit_tiny_patch16_224", "model.img_size=64", "model.global_pool=token",
        "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", "curriculum.name=etpp-deit"]


def test_ema_follows_official_stage_resizes_and_resumes_exactly(data, tmp_path):
    d, stop = 0.9, 15                         # step 15 lies inside the second stage size (48 px: a 6 x 6 grid)
    cfg = lambda out, *more: load_config(FinetuneConfig, None, base(data, out, *DEIT, f"train.ema_decay={d}", *more))  # noqa: E731
    full = run(cfg(tmp_path / "full"))
    n = full["step"]
    ck = ckpts(tmp_path / "full", range(1, n + 1))
    # the EMA starts as the model: its first stage's freshly drawn table, not a final-size one
    # (the first step has lr 0, so the model did not move)
    assert ck[1]["model"]["pos_embed"].shape == (1, 1 + 3 * 3, 32)
    torch.testing.assert_close(ck[1]["model_ema"]["pos_embed"], ck[1]["model"]["pos_embed"], rtol=0, atol=1e-7)
    changes = 0
    for s in range(2, n + 1):
        prev, cur = ck[s - 1]["model_ema"], ck[s]
        for k, v in cur["model_ema"].items():
            assert v.shape == cur["model"][k].shape, (s, k)
            before = prev[k]
            if k == "pos_embed" and before.shape != v.shape:     # a stage change: interpolated first
                before = official_pos_embed(before, int(round((v.shape[1] - 1) ** 0.5)))
                changes += 1
            torch.testing.assert_close(v, d * before + (1 - d) * cur["model"][k], rtol=1e-5, atol=1e-6)
    assert changes == 3                                          # 24 -> 48 -> 56 -> 64 px
    assert ck[stop]["model_ema"]["pos_embed"].shape == (1, 1 + 6 * 6, 32)
    # interrupted inside the 48-px stage and resumed: the same EMA, bit for bit
    run(cfg(tmp_path / "part", f"train.max_steps={stop}"))
    part = run(cfg(tmp_path / "part"))
    assert part["step"] == n and part["best_ema"] == full["best_ema"] and part["eval_ema"] == full["eval_ema"]
    for name in ("checkpoint-latest.pth", "checkpoint-best-ema.pth"):
        a = load_checkpoint(str(tmp_path / "full" / "checkpoints" / name))
        b = load_checkpoint(str(tmp_path / "part" / "checkpoints" / name))
        key = "model_ema" if name == "checkpoint-latest.pth" else "model"
        assert list(a[key]) == list(b[key]) and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), name
    # the best EMA file has the final shapes and loads strictly into the timm model
    best = load_checkpoint(str(tmp_path / "part" / "checkpoints" / "checkpoint-best-ema.pth"))
    assert best["meta"]["param_size"] == 64
    timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=64, patch_size=8, embed_dim=32, depth=1,
                      num_heads=2, global_pool="token").load_state_dict(best["model"], strict=True)
