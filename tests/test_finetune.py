"""Fine-tuning tools: layer decay, checkpoint loading (ours / official MAE), pos-embed interpolation,
strict timm loading, per-step RandAug magnitude, DeiT at every curriculum size, the linear probe."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from efficienttrain.curriculum import get_curriculum
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.distributed import DistInfo
from engine.optim import param_groups_layer_decay, vit_layer_id
from engine.trainer import RunBatches
from finetune.config import ClassifierConfig, FinetuneConfig
from engine.data import image_folder
from engine.demo_data import generate_demo_dataset
from finetune.data import CurriculumTrainDataset
from finetune.main import run
from finetune.models import create_classifier, load_pretrained, make_linear_probe
from pretrain.main import encoder_state_dict
from pretrain.models_mae import create_mae

MAE_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                decoder_depth=1, decoder_num_heads=2)
VIT_TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "set"   # the generator makes its own folder
    generate_demo_dataset(str(root), num_images=48, size=40, val_fraction=0.25)
    return str(root)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_mae("mae_vit_base_patch16", **MAE_TINY)
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.save({"model": model.state_dict(), "meta": {"img_size": 32}}, path)
    return str(path), model.state_dict()


def test_layer_decay_scales_exact_and_match_timm():
    model = timm.create_model("vit_base_patch16_224", num_classes=10, global_pool="avg", depth=4)
    groups = param_groups_layer_decay(model.named_parameters(), 4, 0.05, 0.65, model.no_weight_decay())
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["blocks.3.mlp.fc1.weight"] == pytest.approx(0.65)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 4)
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == pytest.approx(0.65 ** 5)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["blocks.0.norm1.weight"] == 0.0
    assert wd["pos_embed"] == wd["cls_token"] == wd["head.bias"] == 0.0
    # the same scales as timm's own implementation (an independent reference)
    from timm.optim import param_groups_layer_decay as timm_groups

    ref = {}
    for g in timm_groups(model, weight_decay=0.05, layer_decay=0.65, no_weight_decay_list=model.no_weight_decay()):
        for p in g["params"]:
            ref[id(p)] = g["lr_scale"]
    for n, p in model.named_parameters():
        assert scale[n] == pytest.approx(ref[id(p)]), n
    # detection names carry a prefix; the neck and head are "after the blocks"
    assert vit_layer_id("backbone.blocks.2.attn.qkv.weight", 4) == 3
    assert vit_layer_id("backbone.patch_embed.proj.weight", 4) == 0
    assert vit_layer_id("neck.lateral.0.weight", 4) == 5


def test_load_our_mae_checkpoint_with_report_and_pos_embed_interpolation(mae_ckpt):
    path, sd = mae_ckpt
    model = create_classifier(ClassifierConfig(name="vit_base_patch16_224", num_classes=4, img_size=48,
                                               kwargs=VIT_TINY))
    rep = load_pretrained(model, path)
    assert "decoder_pred.weight" in rep.dropped and "mask_token" in rep.dropped and "norm.weight" in rep.dropped
    assert set(rep.initialised) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert rep.resized == ["pos_embed"]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    # pos_embed: 4x4 grid -> 6x6 by bicubic interpolation (independent: F.interpolate), cls slot kept
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(model.pos_embed[:, 1:], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pos_embed[:, :1], sd["pos_embed"][:, :1])


def test_load_official_encoder_file_and_real_errors(mae_ckpt, tmp_path):
    _, sd = mae_ckpt
    official = tmp_path / "mae_pretrain_vit.pth"
    torch.save({"model": encoder_state_dict(sd)}, official)      # the official release layout
    model = create_classifier(ClassifierConfig(name="vit_base_patch16_224", num_classes=3, img_size=32, kwargs=VIT_TINY))
    rep = load_pretrained(model, str(official))
    assert rep.dropped == ["norm.bias", "norm.weight"] or set(rep.dropped) == {"norm.weight", "norm.bias"}
    deeper = create_classifier(ClassifierConfig(name="vit_base_patch16_224", num_classes=3, img_size=32,
                                                kwargs={**VIT_TINY, "depth": 3}))
    with pytest.raises(ValueError, match="lacks weights the model needs: \\['blocks.2"):
        load_pretrained(deeper, str(official))
    wider = create_classifier(ClassifierConfig(name="vit_base_patch16_224", num_classes=3, img_size=32,
                                               kwargs={**VIT_TINY, "embed_dim": 64}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(wider, str(official))


def test_deit_resamples_pos_embed_at_every_etpp_size():
    cfg = ClassifierConfig(name="deit_tiny_patch16_224", num_classes=5, img_size=224, kwargs={"depth": 2})
    model = create_classifier(cfg, dynamic_size=True).eval()
    shape = model.pos_embed.shape
    for size in sorted({s.size for s in get_curriculum("etpp-deit").stages}):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert model.pos_embed.shape == shape                  # no parameter surgery
        # reference: a fixed-size model whose pos_embed was resampled once to this grid
        ref = timm.create_model("deit_tiny_patch16_224", num_classes=5, img_size=size, depth=2, global_pool="avg").eval()
        sd = dict(model.state_dict())
        sd["pos_embed"] = timm.layers.resample_abs_pos_embed(sd["pos_embed"], [size // 16] * 2, num_prefix_tokens=1)
        ref.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)


def test_randaug_magnitude_reaches_the_transforms(data):
    files, labels, _ = image_folder(os.path.join(data, "train"))
    cur = get_curriculum("et", final_size=32, multiple_of=8)
    plan = cur.plan(epochs=3, dataset_size=len(files), batch_size=4)
    seen = {}
    for ps in plan.stages:
        for t, batch in enumerate(RunBatches(plan, 0, len(files), 0, DistInfo()).stage_batches(ps)):
            seen[ps.start_step + t] = {m for _, _, m, _ in batch}
    for step, ms in seen.items():
        assert len(ms) == 1 and ms.pop() == pytest.approx(plan.at(step).magnitude)
    assert plan.at(0).magnitude == 0.0 and plan.at(plan.total_steps - 1).magnitude > 8.5   # 0 -> 9
    ds = CurriculumTrainDataset(files, labels, 32, "rand-m9-mstd0-n2", seed=0)
    low = ds[(0, 5, 0.0, 32)][0]
    assert all(op.magnitude == 0.0 for op in ds.randaug.ops)
    high = ds[(0, 5, 9.0, 32)][0]
    assert all(op.magnitude == 9.0 for op in ds.randaug.ops)
    assert torch.equal(ds[(0, 5, 9.0, 32)][0], high)               # seeded by the stream position
    assert not torch.equal(low, high)                          # the magnitude changes the image


def ft_overrides(data, out, *extra):
    return [f"data.path={data}", "data.num_workers=0", "model.name=vit_base_patch16_224", "model.num_classes=4",
            "model.img_size=32", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            "curriculum.epochs=2", "train.batch_size=8", "train.warmup_epochs=0.5", "train.progress=false",
            f"train.output_dir={out}", "train.device=cpu", "data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25", *extra]


def test_finetune_run_outputs_load_into_timm_strict(data, mae_ckpt, tmp_path):
    path, _ = mae_ckpt
    out = tmp_path / "ft"
    res = run(load_config(FinetuneConfig, None, ft_overrides(data, out, f"model.checkpoint={path}")))
    assert res["step"] == res["total_steps"] and 0 <= res["eval"]["top1"] <= 100
    best = load_checkpoint(str(out / "checkpoints" / "checkpoint-best.pth"))
    vit = timm.create_model("vit_base_patch16_224", global_pool="avg", num_classes=4, img_size=32, **VIT_TINY)
    vit.load_state_dict(best["model"], strict=True)
    groups = (out / "param_groups.txt").read_text()
    assert "lr_scale 0.5625" in groups and "lr_scale 1.0000" in groups        # 0.75^2 for blocks.0, head 1
    # the key layout is the same for every ViT size
    for name in ("vit_small_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        ours = create_classifier(ClassifierConfig(name=name, num_classes=7, kwargs={"depth": 1}))
        ref = timm.create_model(name, global_pool="avg", num_classes=7, depth=1)
        assert set(ours.state_dict()) == set(ref.state_dict())
    # evaluation mode on the result
    ev = run(load_config(FinetuneConfig, None, ft_overrides(data, tmp_path / "ev", "mode=eval",
                                                             f"model.checkpoint={out / 'checkpoints' / 'checkpoint-best.pth'}")))
    assert ev["eval"]["top1"] == pytest.approx(res["best"])
    # frequency analysis: a low-pass radius beyond every frequency of a 32-px image is the identity
    import subprocess
    import sys

    png = tmp_path / "freq.png"
    r = subprocess.run([sys.executable, "tools/analyze_frequency.py", str(out / "checkpoints" / "checkpoint-best.pth"),
                        os.path.join(data, "val"), "--radii", "4", "100", "--out", str(png)],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    freq = json.loads(png.with_suffix(".json").read_text())
    assert freq["low_pass"]["100.0"] == pytest.approx(freq["original"]) == pytest.approx(res["best"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_linear_probe_trains_only_the_head(data, mae_ckpt, tmp_path):
    path, sd = mae_ckpt
    model = create_classifier(ClassifierConfig(name="vit_base_patch16_224", num_classes=4, img_size=32,
                                               global_pool="token", kwargs=VIT_TINY))
    load_pretrained(model, path)
    make_linear_probe(model)
    bn = model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    out = tmp_path / "lp"
    res = run(load_config(FinetuneConfig, None, ft_overrides(
        data, out, "mode=linprobe", "optimizer=lars", f"model.checkpoint={path}", "model.global_pool=token",
        "train.blr=0.1", "train.weight_decay=0.0", "data.mixup=0.0", "data.cutmix=0.0", "data.reprob=0.0",
        "data.randaug=''")))
    final = load_checkpoint(str(out / "checkpoints" / "checkpoint-latest.pth"))["model"]
    torch.testing.assert_close(final["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])   # frozen
    assert final["head.0.num_batches_tracked"] > 0                                                  # BN ran
    assert res["step"] == res["total_steps"]


def test_supervised_curriculum_training_changes_size(data, tmp_path):
    out = tmp_path / "tr"
    res = run(load_config(FinetuneConfig, None, [
        f"data.path={data}", "data.num_workers=0", "mode=train", "model.name=resnet10t", "model.num_classes=4",
        "model.img_size=64", "model.drop_path=0.0", "curriculum.name=etpp-convnext", "curriculum.epochs=2",
        "train.batch_size=8", "train.warmup_epochs=0.2", "train.progress=false", "train.log_every=1",
        f"train.output_dir={out}", "train.betas=[0.9,0.999]"]))
    sizes = [json.loads(line).get("size") for line in open(out / "metrics.jsonl")]
    assert {s for s in sizes if s} == {32, 64}                 # 160/224 scaled to 64, multiples of 32
    assert res["step"] == res["total_steps"] and "top1" in res["eval"]


def test_config_errors(data, mae_ckpt, tmp_path):
    with pytest.raises(Exception, match="model.checkpoint is required for mode 'finetune'"):
        load_config(FinetuneConfig, None, [f"data.path={data}"])
    with pytest.raises(Exception, match="num_classes is 10 but .* has 4 classes"):
        run(load_config(FinetuneConfig, None, [f"data.path={data}", "mode=train", "model.name=resnet10t",
                                               "model.num_classes=10", f"train.output_dir={tmp_path}"]))
    with pytest.raises(Exception, match="trains at the final size"):
        run(load_config(FinetuneConfig, None, ft_overrides(data, tmp_path / "x", "model.checkpoint=" + mae_ckpt[0],
                                                           "curriculum.name=etpp")))


def test_swin_keeps_its_parameters_at_every_etpp_size():
    from finetune.models import check_resizable

    model = create_classifier(ClassifierConfig(name="swin_tiny_patch4_window7_224", num_classes=3,
                                               kwargs={"depths": (1, 1, 1, 1)}))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ref = model.eval()(torch.zeros(1, 3, 224, 224).normal_(generator=torch.Generator().manual_seed(0)))
    for size in (96, 160, 224):
        ok, why = check_resizable(model, size)
        assert ok, why
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    # back at the final size it computes exactly what it did before any stage change
    torch.testing.assert_close(model(torch.zeros(1, 3, 224, 224).normal_(generator=torch.Generator().manual_seed(0))), ref)


def test_every_shipped_config_loads():
    from pretrain.config import PretrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted((root / "finetune").glob("[a-z]*.yaml")):
        cfg = load_config(FinetuneConfig, str(f))
        assert cfg.model.name == "auto" or timm.is_model(cfg.model.name), f
        get_curriculum(cfg.curriculum.name, cfg.model.img_size or 224, cfg.curriculum.multiple_of or 16)
    for f in sorted((root / "pretrain").glob("[a-z]*.yaml")):
        cfg = load_config(PretrainConfig, str(f))
        get_curriculum(cfg.curriculum.name, cfg.model.img_size, cfg.curriculum.multiple_of or cfg.model.patch)


def test_timm_defaults_match_the_mae_encoders():
    """finetune reads an MAE checkpoint's architecture against timm's ViT defaults (it does not import
    pretrain, its sibling); every MAE encoder has exactly its timm counterpart's shapes."""
    from finetune.models import _TIMM_VIT_DEFAULTS, MAE_TO_TIMM
    from pretrain.models_mae import ARCHS

    assert set(MAE_TO_TIMM) == set(ARCHS)
    for arch, name in MAE_TO_TIMM.items():
        assert {k: ARCHS[arch][k] for k in _TIMM_VIT_DEFAULTS[name]} == _TIMM_VIT_DEFAULTS[name], arch
