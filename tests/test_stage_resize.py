"""model.resize=official: Swin windows (size // 32) and ViT position tables re-made per curriculum
stage by bilinear interpolation of the previous stage's, the optimizer moments likewise, exact
resume inside a stage, final checkpoints at the final shapes. The references are written out here
from the official code (LeapLabTHU/EfficientTrain: utils_buffer.py update_ckpt, models/swin.py),
independently of finetune/resize.py."""
import json

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F

from efficienttrain.curriculum import get_curriculum
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config
from engine.demo_data import generate_demo_dataset
from finetune.config import ClassifierConfig, FinetuneConfig
from finetune.main import run
from finetune.models import create_classifier
from finetune.resize import move_optimizer_state, prepare_for_size

SWIN = dict(embed_dim=8, depths=(1, 2, 1, 2), num_heads=(1, 1, 2, 2))
DEIT = dict(embed_dim=32, depth=1, num_heads=2)


# ---- the official recipe, written out ------------------------------------------------------------
def official_rel_table(t, new_window):
    """utils_buffer.py update_ckpt, Swin branch: (2W-1)^2 x heads as a map per head, bilinear."""
    pre, heads, new = int(round(t.shape[0] ** 0.5)), t.shape[1], 2 * new_window - 1
    t = t.view(pre, pre, -1).permute(2, 0, 1).unsqueeze(0)
    t = F.interpolate(t, size=(new, new), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).reshape(new * new, heads)


def official_pos_embed(t, new_grid):
    """utils_buffer.py update_ckpt, DeiT branch: the grid part bilinear, the class token kept."""
    pre = int(round((t.shape[1] - 1) ** 0.5))
    grid = t[:, 1:, :].transpose(1, 2).reshape(1, -1, pre, pre)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return torch.cat((t[:, :1, :], grid.flatten(2).transpose(1, 2)), dim=1)


def official_rel_index(w):
    """models/swin.py WindowAttention.__init__."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def official_attn_mask(res, w, shift):
    """models/swin.py SwinTransformerBlock.__init__ (shifted windows)."""
    img = torch.zeros((1, res, res, 1))
    cnt = 0
    for h in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for v in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, h, v, :] = cnt
            cnt += 1
    win = img.view(1, res // w, w, res // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def adamw_step(model, opt, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(2, 3, size, size, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tables(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}


# ---- Swin ----------------------------------------------------------------------------------------
def test_swin_windows_tables_and_moments_follow_the_official_recipe():
    torch.manual_seed(0)
    model = create_classifier(ClassifierConfig(name="swin_tiny_patch4_window7_224", num_classes=3, kwargs=SWIN),
                              dynamic_size=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prev_window = 7
    for size in (96, 160, 224):
        w = size // 32
        before = {n: p.detach().clone() for n, p in tables(model).items()}
        moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} if p in opt.state else None
                   for n, p in tables(model).items()}
        old_ids = {id(p) for p in model.parameters()}
        swaps = prepare_for_size(model, size)
        move_optimizer_state(opt, swaps)
        assert len(swaps) == sum(SWIN["depths"]) and {s.name for s in swaps} == set(before)
        for name, p in tables(model).items():
            assert id(p) not in old_ids and p.shape == ((2 * w - 1) ** 2, p.shape[1])
            torch.testing.assert_close(p.detach(), official_rel_table(before[name], w), rtol=0, atol=1e-7)
            if moments[name] is not None:      # exp_avg / exp_avg_sq interpolated as the weights, step kept
                for k, v in moments[name].items():
                    torch.testing.assert_close(opt.state[p][k], official_rel_table(v, w), rtol=0, atol=1e-7)
                assert opt.state[p]["step"] == 1 + (size > 160)
        # geometry: window size // 32 everywhere (3 / 5 / 7), shifted windows only where the map is bigger
        grid = size // 4
        for i, stage in enumerate(model.layers):
            res = grid // 2 ** i
            for j, blk in enumerate(stage.blocks):
                assert tuple(blk.window_size) == (w, w) and blk.input_resolution == (res, res)
                shift = w // 2 if j % 2 and res > w else 0
                assert tuple(blk.shift_size) == (shift, shift), (size, i, j)
                assert torch.equal(blk.attn.relative_position_index, official_rel_index(w))
                if shift:
                    torch.testing.assert_close(blk.attn_mask, official_attn_mask(res, w, shift))
                else:
                    assert blk.attn_mask is None
        assert model.layers[-1].blocks[1].shift_size == (0, 0)       # 3x3 / 5x5 / 7x7 map: one window, no shift
        with torch.no_grad():
            assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 3)
        # the optimizer holds the new parameters (no old ones) and one step updates them
        held = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in held} == {id(p) for p in model.parameters()}
        new = {n: p.detach().clone() for n, p in tables(model).items()}
        adamw_step(model, opt, size)
        assert all(not torch.equal(new[n], p) for n, p in tables(model).items())
        prev_window = w
    assert prev_window == 7
    # at the final size: the timm model itself (strict load, same output)
    ref = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, **SWIN).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))


# ---- DeiT ----------------------------------------------------------------------------------------
def test_deit_pos_embed_is_the_chained_bilinear_interpolation_and_moments_follow():
    torch.manual_seed(0)
    cfg = ClassifierConfig(name="deit_tiny_patch16_224", num_classes=3, img_size=224, global_pool="token", kwargs=DEIT)
    model = create_classifier(cfg, dynamic_size=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sizes = sorted({s.size for s in get_curriculum("etpp-deit").stages})
    assert sizes == [96, 160, 192, 224]
    built = model.pos_embed.detach().clone()
    # a fresh run: the first stage's table is drawn at its own shape (the official code builds the
    # model at 96), not downsampled from the 14x14 one
    swaps = prepare_for_size(model, 96, init=torch.Generator().manual_seed(0))
    move_optimizer_state(opt, swaps)
    first = model.pos_embed.detach().clone()
    assert first.shape == (1, 1 + 6 * 6, 32)
    assert not torch.allclose(first, official_pos_embed(built, 6), atol=1e-3)
    assert 0.015 < first.std().item() < 0.025                          # timm / official init: std 0.02
    expected, grids = first, []
    for size in sizes:
        if size > 96:
            m = {k: opt.state[model.pos_embed][k].clone() for k in ("exp_avg", "exp_avg_sq")}
            move_optimizer_state(opt, prepare_for_size(model, size))
            grid = size // 16
            expected = official_pos_embed(expected, grid)             # chained from the previous stage's table
            torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-7)
            for k, v in m.items():
                torch.testing.assert_close(opt.state[model.pos_embed][k], official_pos_embed(v, grid), rtol=0, atol=1e-7)
        grids.append(int(model.pos_embed.shape[1] - 1) ** 0.5)
        # at the stage size the table is used as it is: the output of a timm DeiT built for this size
        ref = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=size, global_pool="token", **DEIT).eval()
        ref.load_state_dict(model.state_dict(), strict=True)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref(x))
        adamw_step(model, opt, size)
        expected = model.pos_embed.detach().clone()
    assert grids == [6, 10, 12, 14]


# ---- the optimizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False, amsgrad=True),
    lambda ps: timm.optim.Lars(ps, lr=1e-2, momentum=0.9),
    lambda ps: timm.optim.Lamb(ps, lr=1e-2),
], ids=["adamw-fused", "adamw-amsgrad", "lars", "lamb"])
def test_optimizer_state_moves_to_the_new_parameters(make):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=64, dynamic_img_size=True, **DEIT)
    opt = make([{"params": [model.pos_embed], "weight_decay": 0.0, "lr_scale": 0.5},
                {"params": [p for n, p in model.named_parameters() if n != "pos_embed"]}])
    adamw_step(model, opt, 64)
    old = model.pos_embed
    state = {k: v.clone() for k, v in opt.state[old].items()}
    move_optimizer_state(opt, prepare_for_size(model, 32))
    new = model.pos_embed
    assert opt.param_groups[0]["params"] == [new] and opt.param_groups[0]["lr_scale"] == 0.5 and old not in opt.state
    for k, v in state.items():
        if v.ndim:                                           # per-element state: interpolated as the weights
            torch.testing.assert_close(opt.state[new][k], official_pos_embed(v, 2), rtol=0, atol=1e-7)
        else:
            assert torch.equal(opt.state[new][k], v)        # step
    before = new.detach().clone()
    adamw_step(model, opt, 32)
    assert not torch.equal(before, new) and len(opt.state_dict()["state"]) == len(list(model.parameters()))


def test_task_draws_untrained_tables_afresh_then_interpolates_and_evaluates_at_the_stage_size():
    from engine.distributed import DistInfo
    from finetune.task import ClassificationTask

    cfg = load_config(FinetuneConfig, None, ["data.path=x", "data.num_workers=0", "mode=train", "model.num_classes=3",
                                             "model.name=deit_tiny_patch16_224", "model.img_size=224",
                                             "model.global_pool=token", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"])
    task = ClassificationTask(cfg, [], [], [], [], DistInfo())
    torch.manual_seed(0)
    model = create_classifier(cfg.model, dynamic_size=True)
    opt = torch.optim.AdamW(model.parameters())
    plan = get_curriculum("etpp-deit").plan(epochs=10, dataset_size=100, batch_size=10)
    by_size = {ps.stage.size: ps for ps in plan.stages}
    built = model.pos_embed.detach().clone()
    assert task.prepare_stage(model, by_size[96], opt)
    assert not torch.allclose(model.pos_embed, official_pos_embed(built, 6), atol=1e-3)    # drawn, not downsampled
    assert not task.prepare_stage(model, by_size[96], opt)                                  # prepared: a no-op
    assert task.best_metric is None and task.checkpoint_meta()["param_size"] == 96
    task.evaluate(model)
    assert task._val_loaders[96].dataset.transform.transforms[1].size == (96, 96)          # centre crop at 96
    adamw_step(model, opt, 96)
    trained = model.pos_embed.detach().clone()
    assert task.prepare_stage(model, by_size[160], opt)                                     # trained: interpolated
    torch.testing.assert_close(model.pos_embed.detach(), official_pos_embed(trained, 10), rtol=0, atol=1e-7)
    assert task.prepare_stage(model, by_size[224], opt) and task.best_metric == "top1"
    forward = load_config(FinetuneConfig, None, ["data.path=x", "data.num_workers=0", "mode=train",
                                                 "model.name=deit_tiny_patch16_224",
                                                 "model.img_size=224", "model.resize=forward"])
    assert not ClassificationTask(forward, [], [], [], [], DistInfo()).prepare_stage(model, by_size[96], opt)


def test_resize_key_is_validated():
    with pytest.raises(ConfigError, match="model.resize: 'bilinear' is not allowed"):
        load_config(FinetuneConfig, None, ["data.path=x", "mode=train", "model.name=resnet10t", "model.resize=bilinear"])


# ---- whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


RUNS = {   # a curriculum, the step to interrupt at (inside the second size), the parameter and its shape there
    "deit": (["model.name=deit_tiny_patch16_224", "model.img_size=64", "model.global_pool=token",
              "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", "curriculum.name=etpp-deit"],
             15, "pos_embed", (1, 1 + 6 * 6, 32), dict(patch_size=8, **DEIT, img_size=64, global_pool="token")),
    "swin": (["model.name=swin_tiny_patch4_window7_224", "model.img_size=224", "curriculum.name=etpp",
              "curriculum.multiple_of=32", "model.kwargs={embed_dim: 8, depths: [1, 2, 1, 2], num_heads: [1, 1, 2, 2]}"],
             13, "layers.0.blocks.0.attn.relative_position_bias_table", (9 * 9, 1), SWIN),
}


@pytest.mark.parametrize("arch", sorted(RUNS))
def test_resume_inside_a_smaller_stage_is_exact_and_final_checkpoints_load_into_timm(arch, data, tmp_path):
    extra, stop, key, shape, timm_kwargs = RUNS[arch]

    def cfg(out, *more):
        return load_config(FinetuneConfig, None, [
            f"data.path={data}", "data.num_workers=0", "mode=train", "model.num_classes=4", "model.drop_path=0.0",
            "curriculum.epochs=2", "train.batch_size=8", "train.warmup_epochs=0.2", "train.progress=false",
            "train.log_every=1", f"train.output_dir={out}", "train.device=cpu", *extra, *more])

    full = run(cfg(tmp_path / "full"))
    run(cfg(tmp_path / "part", f"train.max_steps={stop}"))
    mid = load_checkpoint(str(tmp_path / "part" / "checkpoints" / f"checkpoint-{stop:08d}.pth"))
    assert tuple(mid["model"][key].shape) == shape                     # the stage's shapes, not the final ones
    plan = json.load(open(tmp_path / "full" / "plan.json"))["rows"]
    sizes = [r["size"] for r in plan]
    stage = next(r for r in plan if r["start_step"] < stop < r["end_step"])
    assert stage["size"] == sorted(set(sizes))[1] and mid["meta"]["param_size"] == stage["size"]
    part = run(cfg(tmp_path / "part"))
    assert part["step"] == full["step"] == plan[-1]["end_step"]
    a = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(la) == len(lb) == full["step"]
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert y == pytest.approx(x, rel=1e-5), step
    assert part["eval"] == pytest.approx(full["eval"]) and part["best"] == pytest.approx(full["best"])
    # a checkpoint written at the end of a stage (the default cadence) holds that stage's shapes and
    # is resumed into the next, larger stage the same way
    edge = next(r for r, nxt in zip(plan, plan[1:]) if nxt["size"] != r["size"])
    run(cfg(tmp_path / "edge", f"train.max_steps={edge['end_step']}"))
    ck = load_checkpoint(str(tmp_path / "edge" / "checkpoints" / "checkpoint-latest.pth"))
    assert ck["meta"]["param_size"] == edge["size"] and ck["meta"]["position"]["step"] == edge["end_step"]
    run(cfg(tmp_path / "edge"))
    lc = [json.loads(line)["loss"] for line in open(tmp_path / "edge" / "metrics.jsonl") if '"loss"' in line]
    assert lc == pytest.approx(la, rel=1e-5)
    # final-shape checkpoints: latest and best load strictly into the timm model; best is only kept
    # from final-size stages (smaller stages' evaluations do not compete)
    final_start = next(r["start_step"] for r in plan if r["size"] == sizes[-1])
    for name in ("checkpoint-latest.pth", "checkpoint-best.pth"):
        ck = load_checkpoint(str(tmp_path / "part" / "checkpoints" / name))
        timm.create_model(RUNS[arch][0][0].split("=")[1], num_classes=4, **timm_kwargs).load_state_dict(ck["model"], strict=True)
        assert ck["meta"]["position"]["step"] > final_start and ck["meta"]["param_size"] == sizes[-1]


def test_swin_official_stage_sizes_must_be_multiples_of_32(data, tmp_path, capsys):
    from finetune.main import main

    argv = [f"data.path={data}", "mode=train", "model.num_classes=4", "model.name=swin_tiny_patch4_window7_224",
            "model.img_size=256", "curriculum.name=etpp", "curriculum.epochs=2", "train.warmup_epochs=0.2",
            "model.kwargs={embed_dim: 8, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], window_size: 8}",
            f"train.output_dir={tmp_path / 'run'}", "--dry-run"]
    assert main([*argv, "curriculum.multiple_of=4"]) == 2          # 256 -> 108 / 184 with multiples of 4
    assert "gives Swin the input sizes [108, 184], which are not multiples of 32" in capsys.readouterr().err
    assert main(argv) == 0                                           # the default for Swin: multiples of 32
    assert "stage 0: size 96" in capsys.readouterr().out
