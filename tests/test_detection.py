"""Detection transfer (MMDetection 3.x plug-in): backbone, checkpoint loading, pyramid, layer
decay, configs, demo data, and real mmengine training / evaluation / resume on CPU."""
import glob
import importlib.util
import itertools
import json
import logging
import math
import os
import pickle
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet")
pytestmark = pytest.mark.det

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from detection import (CheckpointMismatchError, PlainViT, SimpleFeaturePyramid,  # noqa: E402
                       SquarePadDataPreprocessor, ViTLayerDecayOptimizerConstructor, load_backbone_checkpoint,
                       mmengine_checkpoint_globals)
from detection.cli import apply_cfg_options, coco_table  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.checkpoint import CheckpointError  # noqa: E402
from pretrain.main import encoder_state_dict, export_encoder  # noqa: E402
from pretrain.models_mae import create_mae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
# pretrained at 64 px (the `ckpts` fixture's MAE), detection input 64 px
TINY = dict(img_size=64, pretrain_img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, window_size=4,
            global_attn_indexes=(1, 3), drop_path_rate=0.0)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on small (2-core, possibly shared) machines OpenMP hand-offs make the
    many tiny ops of detection heads far slower with 2 threads than with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return create_mae("mae_vit_tiny_patch16", img_size=64, patch_size=8, depth=4, decoder_depth=1)


@pytest.fixture(scope="module")
def ckpts(mae, tmp_path_factory):
    """The accepted checkpoint formats, written the way their producers write them."""
    d = tmp_path_factory.mktemp("ckpts")
    sd = mae.state_dict()
    meta = {"kind": "mae_pretrain", "patch_size": 8, "img_size": 64,
            "model_kwargs": {"patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3, "img_size": 64}}
    full = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "meta": meta, "step": 10}
    paths = {"pretrain": d / "checkpoint-latest.pth", "official_encoder": d / "mae_pretrain_vit_tiny.pth",
             "official_full": d / "mae_visualize_vit_tiny.pth", "finetuned": d / "finetuned.pth"}
    torch.save(full, paths["pretrain"])
    paths["encoder"] = Path(export_encoder(full, str(d / "encoder.pth")))
    torch.save({"model": encoder_state_dict(sd)}, paths["official_encoder"])
    torch.save({"model": sd}, paths["official_full"])
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, global_pool="avg",
                            num_classes=5)
    vit.load_state_dict(encoder_state_dict(sd), strict=False)   # as fine-tuning starts from the encoder
    torch.save({"model": vit.state_dict(), "meta": {"kind": "finetune"}}, paths["finetuned"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def demo_encoder(tmp_path_factory):
    """A checkpoint with the geometry of `bash tools/pretrain.sh` (configs/pretrain/demo.yaml),
    which the detection demo configs load: full pretraining file and exported encoder."""
    torch.manual_seed(0)
    m = create_mae("mae_vit_tiny_patch16", img_size=48, patch_size=4, depth=4, decoder_depth=1)
    meta = {"kind": "mae_pretrain", "patch_size": 4, "img_size": 48,
            "model_kwargs": {"patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3, "img_size": 48}}
    d = tmp_path_factory.mktemp("demo_encoder")
    full = {"model": m.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "meta": meta, "step": 10}
    torch.save(full, d / "checkpoint-latest.pth")
    torch.save({"model": encoder_state_dict(m.state_dict())}, d / "mae_pretrain_vit_tiny.pth")   # official layout
    return {"pretrain": str(d / "checkpoint-latest.pth"), "encoder": export_encoder(full, str(d / "encoder.pth")),
            "official_encoder": str(d / "mae_pretrain_vit_tiny.pth")}


def test_demo_configs_match_the_pretraining_demo():
    """The detection demos load runs/demo/encoder.pth: their backbone must have its geometry."""
    from engine.config import load_config
    from pretrain.config import PretrainConfig

    pre = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "demo.yaml", [])
    for name in ("retinanet", "cascade-mask-rcnn"):
        b = Config.fromfile(str(CONFIGS / f"{name}_vit-tiny-mae_sfp_demo.py")).model.backbone
        assert (b.pretrain_img_size, b.patch_size, b.depth) == (pre.model.img_size, pre.model.patch, pre.model.depth), name
        assert b.embed_dim == 192 and pre.model.arch == "mae_vit_tiny_patch16"


@pytest.fixture(scope="module")
def demo_coco(tmp_path_factory):
    gen = _load_tool("make_demo_coco")
    return gen.generate(str(tmp_path_factory.mktemp("data") / "demo_coco")) + "/"


# ---- backbone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(64, 64), (96, 128), (128, 96), (100, 75), (33, 47), (8, 8)])
def test_backbone_output_shapes_any_input_size(hw):
    torch.manual_seed(0)
    vit = PlainViT(**TINY, use_rel_pos=True).eval()
    with torch.no_grad():
        (out,) = vit(torch.randn(2, 3, *hw))
    assert out.shape == (2, 192, math.ceil(hw[0] / 8), math.ceil(hw[1] / 8))
    assert torch.isfinite(out).all()


def test_window_attention_is_local_and_global_blocks_mix():
    """A change in one window only reaches that window through windowed blocks; one global
    block spreads it everywhere. A window covering the whole map equals global attention."""
    torch.manual_seed(0)
    local = PlainViT(**{**TINY, "global_attn_indexes": ()}, use_abs_pos=False).eval()
    x = torch.randn(1, 3, 96, 96)               # 12 x 12 tokens, 3 x 3 windows of 4
    y = x.clone()
    y[:, :, :8, :8] += 1.0                      # token (0, 0)
    with torch.no_grad():
        diff = (local(x)[0] - local(y)[0]).abs().sum(1)[0]
    assert diff[:4, :4].min() > 0 and diff[4:, :].max() == 0 and diff[:, 4:].max() == 0
    mixed = PlainViT(**{**TINY, "global_attn_indexes": (1,)}, use_abs_pos=False).eval()
    with torch.no_grad():
        assert (mixed(x)[0] - mixed(y)[0]).abs().sum(1)[0].min() > 0

    whole = PlainViT(**{**TINY, "window_size": 12, "global_attn_indexes": ()}).eval()
    glob_ = PlainViT(**{**TINY, "window_size": 0}).eval()
    glob_.load_state_dict(whole.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(whole(x)[0], glob_(x)[0], rtol=1e-5, atol=1e-5)


def test_relative_position_bias_is_used_and_trained():
    torch.manual_seed(0)
    vit = PlainViT(**TINY, use_rel_pos=True)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = vit(x)[0]
        vit.blocks[1].attn.rel_pos_h.normal_()
        assert not torch.allclose(vit(x)[0], ref)   # global block at a grid (8x10) off the table's size
    vit(x)[0].sum().backward()
    assert vit.blocks[0].attn.rel_pos_w.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = PlainViT(**TINY, use_rel_pos=True)
    b = PlainViT(**TINY, use_rel_pos=True, with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 72, 56)
    for m in (a, b):
        m.train()
        m(x)[0].square().mean().backward()
    torch.testing.assert_close(a.blocks[2].mlp.fc1.weight.grad, b.blocks[2].mlp.fc1.weight.grad)
    torch.testing.assert_close(a.patch_embed.proj.weight.grad, b.patch_embed.proj.weight.grad)


def test_backbone_rejects_bad_configs():
    with pytest.raises(ValueError, match="outside 0..3"):
        PlainViT(**{**TINY, "global_attn_indexes": (4,)})
    with pytest.raises(ValueError, match="no default global_attn_indexes for depth 4"):
        PlainViT(**{**TINY, "global_attn_indexes": None})
    with pytest.raises(ValueError, match="pretrain_img_size 60 is not a positive multiple of patch_size 8"):
        PlainViT(**{**TINY, "pretrain_img_size": 60})
    with pytest.raises(ValueError, match="PlainViT img_size 1001 is not a positive multiple of patch_size 8"):
        PlainViT(**{**TINY, "img_size": 1001})
    with pytest.raises(ValueError, match="init_cfg must be None or dict"):
        PlainViT(**TINY, init_cfg=dict(type="Kaiming"))
    with pytest.raises(ValueError, match="optional prefix='backbone.'"):
        PlainViT(**TINY, init_cfg=dict(type="Pretrained", checkpoint="x.pth", map_location="cpu"))
    assert PlainViT(depth=12, embed_dim=64, num_heads=2).global_attn_indexes == (2, 5, 8, 11)


# ---- checkpoint loading ------------------------------------------------------------------------
def _capture_logger(name):
    records = []
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers = [type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()]
    logger.propagate = False
    return logger, records


@pytest.mark.parametrize("fmt, unused", [
    ("pretrain", {"decoder", "mask token", "cls token", "final encoder norm"}),
    ("encoder", {"cls token", "final encoder norm"}),
    ("finetuned", {"cls token", "classifier norm", "classification head"}),
    ("official_encoder", {"cls token", "final encoder norm"}),
    ("official_full", {"decoder", "mask token", "cls token", "final encoder norm"}),
])
def test_loads_every_checkpoint_format_with_key_report(ckpts, mae, fmt, unused):
    vit = PlainViT(**TINY, use_rel_pos=True, init_cfg=dict(type="Pretrained", checkpoint=ckpts[fmt]))
    logger, records = _capture_logger(f"ckpt-{fmt}")
    report = load_backbone_checkpoint(vit, ckpts[fmt], logger=logger)
    assert report.ok
    assert {next(w for w in unused if w.lower() in why.lower()) for why in report.unused} == unused
    assert sorted(sum(report.detection_only.values(), [])) == sorted(
        f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw")
    src = mae.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "blocks.2.norm1.weight"):
        assert torch.equal(vit.state_dict()[key], src[key]), key
    assert torch.equal(vit.pos_embed, src["pos_embed"][:, 1:])          # cls slot dropped, same grid
    text = "\n".join(records)
    assert "51 tensors loaded" in text and "expected miss, relative position bias" in text and "ERROR" not in text

    # through mmengine's init path, as init_cfg=dict(type='Pretrained', ...) in a config
    fresh = PlainViT(**TINY, use_rel_pos=True, init_cfg=dict(type="Pretrained", checkpoint=ckpts[fmt]))
    fresh.init_weights()
    assert torch.equal(fresh.blocks[1].attn.proj.weight, src["blocks.1.attn.proj.weight"])


def test_pos_embed_is_resampled_to_the_backbone_grid(ckpts, mae):
    """A 64 px / patch-8 table (8x8 + cls) in a backbone pretrained-size 96 (12x12): the cls slot
    is dropped and the grid resampled bicubically without antialiasing (reference: ViTDet's
    get_abs_pos / MAE's interpolate_pos_embed, torch's interpolate on the 2-D grid)."""
    vit = PlainViT(**{**TINY, "pretrain_img_size": 96})
    report = load_backbone_checkpoint(vit, ckpts["encoder"])
    assert any("cls slot dropped" in n and "12x12" in n for n in report.notes)
    grid = mae.state_dict()["pos_embed"][:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(vit.pos_embed.detach(), ref.permute(0, 2, 3, 1).reshape(1, 144, 192))
    # at run time the table follows each input's grid the same way
    with torch.no_grad():
        pos = vit.pos_embed_for((6, 10))
    ref2 = F.interpolate(ref, size=(6, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos, ref2.permute(0, 2, 3, 1))


def test_init_cfg_prefix_takes_the_backbone_of_a_detector_checkpoint(tmp_path):
    """init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.') as mmengine's: the keys
    under the prefix, without it (relative tables included: a detector's file has them)."""
    torch.manual_seed(0)
    src = PlainViT(**TINY, use_rel_pos=True)
    with torch.no_grad():
        src.blocks[1].attn.rel_pos_h.normal_()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["neck.outputs.0.0.weight"] = torch.zeros(4, 192, 1, 1)
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, tmp_path / "detector.pth")
    vit = PlainViT(**TINY, use_rel_pos=True,
                   init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "detector.pth"), prefix="backbone."))
    vit.init_weights()
    for key, value in src.state_dict().items():
        assert torch.equal(vit.state_dict()[key], value), key
    with pytest.raises(CheckpointMismatchError, match=r"has no keys under init_cfg prefix 'bb\.' \(its key prefixes: "
                                                      r"\['backbone\.', 'neck\.'\]\)"):
        load_backbone_checkpoint(PlainViT(**TINY), str(tmp_path / "detector.pth"), prefix="bb.")
    with pytest.raises(CheckpointMismatchError, match=r"prefix='backbone\.'\)"):   # the hint without a prefix
        load_backbone_checkpoint(PlainViT(**TINY), str(tmp_path / "detector.pth"))


def test_real_checkpoint_errors_raise_before_copying(ckpts, mae, tmp_path):
    vit = PlainViT(**{**TINY, "depth": 3, "global_attn_indexes": (1,)})
    before = vit.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match=r"(?s)keys the backbone does not have.*blocks\.3\..*"
                                                      r"file has 4 blocks, the backbone depth=3"):
        load_backbone_checkpoint(vit, ckpts["encoder"])
    assert torch.equal(vit.blocks[0].attn.qkv.weight, before)             # nothing copied

    with pytest.raises(CheckpointMismatchError, match=r"(?s)shape mismatch patch_embed\.proj\.weight.*patch size 8"):
        load_backbone_checkpoint(PlainViT(**{**TINY, "patch_size": 16}), ckpts["encoder"])

    sd = encoder_state_dict(mae.state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match=r"weights missing from the file: 1: blocks\.1\.attn\.qkv\.weight"):
        load_backbone_checkpoint(PlainViT(**TINY), str(tmp_path / "broken.pth"))

    with pytest.raises(CheckpointError, match="pretrained '.*nowhere.pth' does not exist: set `pretrained`"):
        load_backbone_checkpoint(PlainViT(**TINY), str(tmp_path / "nowhere.pth"))

    class Evil:   # anything but tensors and plain containers is refused (weights_only=True)
        def __reduce__(self):
            return (os.getcwd, ())
    torch.save({"model": sd, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth' is not a readable PyTorch checkpoint .*holds Python objects"):
        load_backbone_checkpoint(PlainViT(**TINY), str(tmp_path / "evil.pth"))
    assert issubclass(CheckpointMismatchError, CheckpointError)     # a user error for the command lines


# ---- simple feature pyramid ----------------------------------------------------------------------
@pytest.mark.parametrize("backbone_stride, strides, extra, kind", [
    (16, (4, 8, 16, 32), 1, "maxpool"),   # ViT-B Cascade Mask R-CNN
    (16, (8, 16, 32), 2, "conv"),         # ViT-B RetinaNet
    (8, (4, 8, 16, 32), 1, "maxpool"),    # patch-8 demo backbone
    (8, (8, 16, 32), 2, "conv"),
])
def test_simple_feature_pyramid_strides(backbone_stride, strides, extra, kind):
    neck = SimpleFeaturePyramid(in_channels=32, out_channels=16, backbone_stride=backbone_stride, strides=strides,
                                extra_levels=extra, extra_type=kind)
    neck.init_weights()
    H, W = 256, 192
    x = torch.randn(2, 32, H // backbone_stride, W // backbone_stride)
    outs = neck((x,))
    assert neck.strides == strides + tuple(strides[-1] * 2 ** (i + 1) for i in range(extra))
    assert [tuple(o.shape) for o in outs] == [(2, 16, math.ceil(H / s), math.ceil(W / s)) for s in neck.strides]
    n_deconv = sum(isinstance(m, nn.ConvTranspose2d) for m in neck.modules())
    assert n_deconv == sum(max(0, int(math.log2(backbone_stride / s))) for s in strides)


def test_simple_feature_pyramid_rejects_bad_strides():
    with pytest.raises(ValueError, match="not a power-of-2 multiple"):
        SimpleFeaturePyramid(32, 16, backbone_stride=16, strides=(4, 12))
    with pytest.raises(ValueError, match="ascending"):
        SimpleFeaturePyramid(32, 16, strides=(16, 8))
    with pytest.raises(ValueError, match="allowed: maxpool, conv"):
        SimpleFeaturePyramid(32, 16, extra_type="avg")
    with pytest.raises(ValueError, match="single map"):
        SimpleFeaturePyramid(32, 16)((torch.zeros(1, 32, 4, 4),) * 2)
    with pytest.raises(ValueError, match="stride 0 is not a power-of-2 multiple or fraction of the backbone stride 16"):
        SimpleFeaturePyramid(32, 16, strides=(0, 8))
    with pytest.raises(ValueError, match="backbone_stride must be a positive integer"):
        SimpleFeaturePyramid(32, 16, backbone_stride=0)


# ---- fixed square padding ------------------------------------------------------------------------
def _batch(*shapes, seed=0):
    """uint8 images [3, h, w] with their data samples, as mmdet's pipeline hands them over."""
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    return dict(inputs=inputs, data_samples=[DetDataSample(metainfo=dict(img_shape=(h, w))) for h, w in shapes])


def test_square_padding_makes_features_independent_of_the_batch():
    """An image gives the same backbone features alone and batched with a larger one, in training
    and testing, once every batch is padded to the one square (mmdet's default padding to the
    batch's largest image changes the position embeddings of the same tokens)."""
    from mmdet.models.data_preprocessors import DetDataPreprocessor
    torch.manual_seed(0)
    vit = PlainViT(**TINY, use_rel_pos=True).eval()                      # made for a 64 px input
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
    norm = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32)
    a, b = (24, 40), (64, 48)                                            # a: 3x5 tokens

    def features(pre, shapes, training):
        data = _batch(*shapes)
        data["inputs"][0] = _batch(a)["inputs"][0]                       # the same image a first
        out = pre(data, training)
        with torch.no_grad():
            return vit(out["inputs"])[0][:1, :, :3, :5], out

    square = SquarePadDataPreprocessor(square_size=64, **norm)
    for training in (False, True):
        alone, out = features(square, [a], training)
        assert tuple(out["inputs"].shape[-2:]) == (64, 64)
        assert out["data_samples"][0].batch_input_shape == (64, 64) == out["data_samples"][0].pad_shape
        batched, _ = features(square, [a, b], training)
        torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)
    plain = DetDataPreprocessor(**norm)                                  # pads to 32x64, then to 64x64
    assert (features(plain, [a], False)[0] - features(plain, [a, b], False)[0]).abs().max() > 1e-3

    with pytest.raises(ConfigError, match=r"an image of 96x48 .*does not fit model.data_preprocessor.square_size=64"):
        square(_batch((96, 48)), False)
    with pytest.raises(ConfigError, match="square_size must be a positive multiple of pad_size_divisor 32"):
        SquarePadDataPreprocessor(square_size=100, pad_size_divisor=32)


def test_square_padding_pads_the_masks_in_training():
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    data = _batch((24, 40))
    data["data_samples"][0].gt_instances = InstanceData(masks=BitmapMasks(np.ones((2, 24, 40), np.uint8), 24, 40))
    out = SquarePadDataPreprocessor(square_size=64, pad_mask=True, pad_size_divisor=32)(data, True)
    masks = out["data_samples"][0].gt_instances.masks
    assert (masks.height, masks.width) == (64, 64) and masks.to_ndarray().sum() == 2 * 24 * 40


# ---- layer-wise lr decay -----------------------------------------------------------------------
class _Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = PlainViT(**TINY, use_rel_pos=True)
        self.neck = SimpleFeaturePyramid(192, 16, backbone_stride=8)
        self.bbox_head = nn.Linear(16, 4)


def test_layer_decay_optimizer_groups(tmp_path):
    MMLogger.get_instance("test_layer_decay", log_file=str(tmp_path / "ld.log"))   # the current logger
    model = _Detector()
    ctor = ViTLayerDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay=0.7))
    wrapper = ctor(model)
    setting = {}
    for g in wrapper.optimizer.param_groups:
        for p in g["params"]:
            setting[p] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert set(setting) == set(named.values())

    def lr(name):
        return setting[named[name]][0] / 1e-3

    def wd(name):
        return setting[named[name]][1]

    for i in range(4):   # blocks.i -> 0.7 ** (4 - i)
        for suffix in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight", "attn.rel_pos_h"):
            assert lr(f"backbone.blocks.{i}.{suffix}") == pytest.approx(0.7 ** (4 - i))
    assert lr("backbone.blocks.3.attn.qkv.weight") == pytest.approx(0.7)
    assert lr("backbone.blocks.0.attn.qkv.weight") == pytest.approx(0.7 ** 4)
    for name in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "backbone.pos_embed"):
        assert lr(name) == pytest.approx(0.7 ** 5)
    for name in ("neck.outputs.0.0.weight", "neck.scales.0.0.weight", "bbox_head.weight", "bbox_head.bias"):
        assert lr(name) == pytest.approx(1.0)
    # weight decay: matrices yes; biases, norms and position embeddings no
    assert wd("backbone.blocks.2.attn.qkv.weight") == 0.05 and wd("bbox_head.weight") == 0.05
    assert wd("backbone.blocks.2.attn.qkv.bias") == 0 and wd("backbone.blocks.2.norm2.weight") == 0
    assert wd("backbone.pos_embed") == 0 and wd("neck.outputs.0.1.weight") == 0 and wd("bbox_head.bias") == 0

    log = (tmp_path / "ld.log").read_text()
    assert "layer-wise lr decay 0.7 over depth 4" in log
    for scale in (0.7 ** 5, 0.7 ** 4, 0.7 ** 3, 0.7 ** 2, 0.7, 1.0):
        assert f"lr_scale {scale:.4f}" in log

    with pytest.raises(ValueError, match="needs paramwise_cfg=dict\\(layer_decay=...\\)"):
        ViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)), {})
    with pytest.raises(ValueError, match="unknown paramwise_cfg keys \\['decay_rate'\\]; allowed: layer_decay"):
        ViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
                                          dict(layer_decay=0.7, decay_rate=0.7))
    with pytest.raises(ValueError, match="cannot infer the ViT depth"):
        ViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
                                          dict(layer_decay=0.7))(nn.Linear(2, 2))


def test_vitdet_weight_decay_rule(tmp_path):
    """ViTDet's groups (detectron2's get_default_optimizer_params, weight_decay_norm=0, pos_embed
    override): no decay for torch LayerNorms (the ViT's) and pos_embed only; biases, relative
    tables and the channel LayerNorms of neck / heads (detectron2's own LayerNorm class) decay."""
    MMLogger.get_instance("test_vitdet_rule", log_file=str(tmp_path / "ld.log"))
    model = _Detector()
    ctor = ViTLayerDecayOptimizerConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.1)),
        paramwise_cfg=dict(layer_decay=0.7, weight_decay_rule="vitdet"))
    setting = {p: (g["lr"], g["weight_decay"]) for g in ctor(model).optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(setting) == set(named.values())
    not_decayed = {n for n, p in named.items() if setting[p][1] == 0}
    assert not_decayed == {"backbone.pos_embed"} | {f"backbone.blocks.{i}.norm{j}.{w}" for i in range(4)
                                                    for j in (1, 2) for w in ("weight", "bias")}
    for name in ("backbone.blocks.1.attn.qkv.bias", "backbone.blocks.1.attn.rel_pos_h",
                 "backbone.patch_embed.proj.bias", "neck.outputs.0.1.weight", "neck.outputs.0.1.bias", "bbox_head.bias"):
        assert setting[named[name]][1] == 0.1, name
    for name, scale in (("backbone.blocks.3.norm1.weight", 0.7), ("backbone.pos_embed", 0.7 ** 5),
                        ("backbone.blocks.0.attn.qkv.bias", 0.7 ** 4), ("neck.outputs.0.1.bias", 1.0)):
        assert setting[named[name]][0] == pytest.approx(1e-3 * scale), name
    with pytest.raises(ValueError, match="weight_decay_rule 'bias' is unknown; allowed: default, vitdet"):
        ViTLayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.1)),
                                          dict(layer_decay=0.7, weight_decay_rule="bias"))


def test_cascade_heads_are_vitdets():
    """2-conv RPN, 4conv1fc box heads and a 4-conv mask head, their convolutions followed by a
    LayerNorm over channels (LN2d; mmdet's 'LN' would normalise the width of an NCHW map)."""
    from mmcv.cnn import ConvModule, build_norm_layer
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py")).model
    rpn = MODELS.build({**cfg.rpn_head, "train_cfg": cfg.train_cfg.rpn, "test_cfg": cfg.test_cfg.rpn})
    assert [type(m) for m in rpn.rpn_conv] == [ConvModule, ConvModule]
    assert all(m.conv.kernel_size == (3, 3) and not m.with_norm and m.with_activation for m in rpn.rpn_conv)
    for head_cfg in cfg.roi_head.bbox_head:
        head = MODELS.build(head_cfg)
        assert len(head.shared_convs) == 4 and [fc.out_features for fc in head.shared_fcs] == [1024]
        for conv in head.shared_convs:
            assert type(conv.norm).__name__ == "LayerNorm2d" and conv.norm.eps == 1e-6 and conv.conv.bias is None
    mask = MODELS.build(cfg.roi_head.mask_head)
    assert len(mask.convs) == 4 and all(type(c.norm).__name__ == "LayerNorm2d" for c in mask.convs)
    _, ln = build_norm_layer(dict(type="LN2d", eps=1e-6), 8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        x = torch.randn(2, 8, 5, 7)
        mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        ref = (x - mu) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
        torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)


# ---- configs ------------------------------------------------------------------------------------
# detectron2's ViTDet recipe, the reference the *_vitdet_100ep configs must equal (values read from
# facebookresearch/detectron2; each with the file it comes from):
D2_VITDET = dict(
    # projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py (cascade_mask_rcnn_vitdet_b_100ep.py
    # imports its train / lr_multiplier / optimizer): train.max_iter, MultiStepParamScheduler
    # milestones, WarmupParamScheduler(warmup_length=250 / max_iter, warmup_factor=0.001), lr x0.1 twice
    max_iter=184375, milestones=(163889, 177546), warmup_iters=250, warmup_factor=0.001, gamma=0.1,
    # projects/ViTDet/configs/common/coco_loader_lsj.py: image_size 1024, total_batch_size 64,
    # RandomFlip -> ResizeScale(min_scale 0.1, max_scale 2.0) -> FixedSizeCrop(1024), recompute_boxes
    image_size=1024, total_batch=64, scale_range=(0.1, 2.0),
    # configs/common/optim.py AdamW: lr 1e-4, betas (0.9, 0.999), weight_decay 0.1, weight_decay_norm 0;
    # mask_rcnn_vitdet_b_100ep.py: overrides {"pos_embed": {"weight_decay": 0.0}}
    lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1,
    # configs/common/models/mask_rcnn_vitdet.py: ViT(img_size=1024, patch_size=16, window_size=14,
    # use_rel_pos=True), SimpleFeaturePyramid(scale_factors=(4.0, 2.0, 1.0, 0.5), LastLevelMaxPool,
    # norm "LN", square_pad=1024), RPN head conv_dims [-1, -1], box head 4 convs of 256 + fc 1024 with
    # conv_norm "LN", mask head conv_norm "LN"
    patch_size=16, window_size=14, pyramid_strides=(4, 8, 16, 32), rpn_convs=2, box_convs=4, box_fc=1024,
)
D2_VIT_SIZES = {
    # configs/common/models/mask_rcnn_vitdet.py (ViT-B: embed_dim, depth, num_heads, dp = 768, 12, 12, 0.1;
    # window_block_indexes leave 2, 5, 8, 11 global); mask_rcnn_vitdet_b_100ep.py: lr_decay_rate=0.7
    "b": dict(embed_dim=768, depth=12, num_heads=12, drop_path=0.1, global_blocks=(2, 5, 8, 11), lr_decay=0.7),
    # projects/ViTDet/configs/COCO/mask_rcnn_vitdet_l_100ep.py: 1024 / 24 / 16, drop_path_rate 0.4,
    # "5, 11, 17, 23 for global attention", lr_decay_rate=0.8, num_layers=24
    "l": dict(embed_dim=1024, depth=24, num_heads=16, drop_path=0.4, global_blocks=(5, 11, 17, 23), lr_decay=0.8),
}
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py: Box2BoxTransform weights (10, 5),
# (20, 10), (30, 15) per stage (stds 1/w), matcher IoUs 0.5 / 0.6 / 0.7, class-agnostic regression
D2_CASCADE_STDS = [[1 / w1, 1 / w1, 1 / w2, 1 / w2] for w1, w2 in ((10, 5), (20, 10), (30, 15))]
D2_CASCADE_IOUS = (0.5, 0.6, 0.7)
# the papers' 1x protocol = mmdet's own configs/_base_/schedules/schedule_1x.py (ConvNeXt's / Swin's
# detection code is mmdet): read from the installed mmdet, not restated here
MMDET_1X = Path(importlib.util.find_spec("mmdet").origin).parent / ".mim" / "configs" / "_base_" / "schedules" / \
    "schedule_1x.py"
GPUS_PER_RECIPE = {"sfp_1x": 8, "vitdet_100ep": 16}   # the launches the configs document (8 GPUs / 2 nodes x 8)
FULL_CONFIGS = [
    (f"{det}_vit-{size}-mae_{recipe}_coco", size, kind, recipe)
    for det, kind in (("retinanet", "RetinaNet"), ("cascade-mask-rcnn", "CascadeRCNN"))
    for size in ("b", "l") for recipe in ("sfp_1x", "vitdet_100ep")]


def d2_milestones(max_iter):
    """detectron2's ViTDet milestones as fractions of the schedule: 8/9 (0.889) and 26/27 (0.963)
    of max_iter (88.9 and 96.3 of its 100 epochs), for any length (its 50ep / 75ep configs scale them)."""
    return [round(max_iter * 8 / 9), round(max_iter * 26 / 27)]


def test_d2_milestone_fractions_reproduce_detectron2s_numbers():
    assert d2_milestones(D2_VITDET["max_iter"]) == list(D2_VITDET["milestones"])


@pytest.mark.parametrize("name, size, detector, recipe", FULL_CONFIGS)
def test_full_configs(name, size, detector, recipe):
    """Every full ViT config against detectron2's ViTDet recipe (D2_VITDET / D2_VIT_SIZES, cited
    above): the model always, the 100-epoch schedule / LSJ / batch for *_vitdet_100ep, mmdet's
    schedule_1x.py for *_sfp_1x."""
    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    d2, arch = D2_VITDET, D2_VIT_SIZES[size]
    assert cfg.custom_imports == dict(imports=["detection"], allow_failed_imports=False)
    assert cfg.model.type == detector and cfg.model.backbone.type == "PlainViT"
    b = cfg.model.backbone
    assert (b.embed_dim, b.depth, b.num_heads, b.drop_path_rate) == (arch["embed_dim"], arch["depth"],
                                                                     arch["num_heads"], arch["drop_path"])
    assert tuple(b.global_attn_indexes) == arch["global_blocks"]
    assert (b.img_size, b.patch_size, b.window_size) == (d2["image_size"], d2["patch_size"], d2["window_size"])
    assert b.pretrain_img_size == 224                       # MAE's ImageNet input: the 14x14 position table
    assert b.use_rel_pos
    assert cfg.model.data_preprocessor.type == "SquarePadDataPreprocessor"
    assert cfg.model.data_preprocessor.square_size == d2["image_size"]          # square_pad=1024
    assert b.init_cfg == dict(type="Pretrained", checkpoint=cfg.pretrained)
    neck = cfg.model.neck
    assert neck.in_channels == arch["embed_dim"] and neck.backbone_stride == d2["patch_size"]
    ow = cfg.optim_wrapper
    assert ow.constructor == "ViTLayerDecayOptimizerConstructor"
    assert ow.paramwise_cfg.layer_decay == arch["lr_decay"] and ow.paramwise_cfg.weight_decay_rule == "vitdet"
    opt = ow.optimizer
    assert (opt.type, opt.lr, tuple(opt.betas), opt.weight_decay) == ("AdamW", d2["lr"], d2["betas"], d2["weight_decay"])
    assert ow.type == "AmpOptimWrapper"                     # train.amp.enabled = True (mask_rcnn_vitdet_b_100ep.py)
    test_ops = {t.type: t for t in cfg.test_dataloader.dataset.pipeline}
    assert test_ops["Resize"].scale == (d2["image_size"],) * 2 and test_ops["Resize"].keep_ratio
    train_ops = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    per_step = cfg.train_dataloader.batch_size * GPUS_PER_RECIPE[recipe]
    assert cfg.auto_scale_lr.base_batch_size == per_step
    if recipe == "sfp_1x":
        ref = Config.fromfile(str(MMDET_1X))
        assert cfg.train_cfg.type == ref.train_cfg.type and cfg.train_cfg.max_epochs == ref.train_cfg.max_epochs
        ours = [s for s in cfg.param_scheduler if s.type == "MultiStepLR"]
        theirs = [s for s in ref.param_scheduler if s.type == "MultiStepLR"]
        assert len(ours) == 1 and ours[0].milestones == theirs[0].milestones and ours[0].by_epoch
        assert per_step == ref.auto_scale_lr.base_batch_size                     # 8 GPUs x 2
        assert train_ops[-3:] == ["Resize", "RandomFlip", "PackDetInputs"]
        assert {t.type: t for t in cfg.train_dataloader.dataset.pipeline}["Resize"].scale == (d2["image_size"],) * 2
    else:
        assert per_step == d2["total_batch"]
        assert cfg.train_cfg.type == "IterBasedTrainLoop" and cfg.train_cfg.max_iters == d2["max_iter"]
        assert "max_epochs" not in cfg.train_cfg
        warm, steps = cfg.param_scheduler
        assert (warm.type, warm.start_factor, warm.end, warm.by_epoch) == ("LinearLR", d2["warmup_factor"],
                                                                          d2["warmup_iters"], False)
        assert (steps.type, steps.by_epoch, steps.gamma) == ("MultiStepLR", False, d2["gamma"])
        assert steps.milestones == d2_milestones(cfg.train_cfg.max_iters) == list(d2["milestones"])
        ops = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
        assert ops["RandomResize"].scale == (d2["image_size"],) * 2
        assert tuple(ops["RandomResize"].ratio_range) == d2["scale_range"]
        assert ops["RandomCrop"].crop_size == (d2["image_size"],) * 2 and ops["RandomCrop"].recompute_bbox
        assert train_ops.index("RandomFlip") < train_ops.index("RandomResize") < train_ops.index("RandomCrop")
    if detector == "CascadeRCNN":   # ViTDet's heads
        assert cfg.model.neck.strides == d2["pyramid_strides"]
        assert (cfg.model.neck.extra_levels, cfg.model.neck.extra_type) == (1, "maxpool")     # LastLevelMaxPool
        assert cfg.model.rpn_head.num_convs == d2["rpn_convs"]
        assert cfg.model.train_cfg.rpn.allowed_border == -1       # detectron2's RPN boundary_threshold: no anchor dropped
        heads = cfg.model.roi_head.bbox_head
        for head, stds, rcnn, iou in zip(heads, D2_CASCADE_STDS, cfg.model.train_cfg.rcnn, D2_CASCADE_IOUS):
            assert head.type == "Shared4Conv1FCBBoxHead" and head.norm_cfg == dict(type="LN2d", eps=1e-6)
            assert head.fc_out_channels == d2["box_fc"] and head.reg_class_agnostic
            assert head.bbox_coder.target_stds == pytest.approx(stds, abs=1e-3)
            assert head.loss_bbox.type == "L1Loss"                # smooth_l1_beta 0
            assert rcnn.assigner.pos_iou_thr == rcnn.assigner.neg_iou_thr == iou
        assert cfg.model.roi_head.mask_head.norm_cfg == dict(type="LN2d", eps=1e-6)
        # one mask head as detectron2's CascadeROIHeads in ViTDet's recipe; the 1x protocol keeps mmdet's
        assert cfg.model.roi_head.type == ("ViTDetCascadeRoIHead" if recipe == "vitdet_100ep" else "CascadeRoIHead")
    else:
        assert (cfg.model.neck.extra_levels, cfg.model.neck.extra_type) == (2, "conv")   # P6 / P7
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.data_root == cfg.data_root == "data/coco/"
    assert cfg.val_evaluator.ann_file == "data/coco/annotations/instances_val2017.json"
    assert cfg.val_evaluator.metric == ("bbox" if detector == "RetinaNet" else ["bbox", "segm"])
    assert cfg.runner_type == "DetRunner"

    # --cfg-options data_root / pretrained reach every derived field; explicit keys win
    changed = apply_cfg_options(cfg, {"data_root": "/data/coco", "pretrained": "/w/enc.pth",
                                      "test_evaluator.ann_file": "/other/test.json"})
    assert cfg.data_root == "/data/coco/" and cfg.model.backbone.init_cfg.checkpoint == "/w/enc.pth"
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.data_root == "/data/coco/"
    assert cfg.val_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"
    assert cfg.test_evaluator.ann_file == "/other/test.json"
    assert "model.backbone.init_cfg.checkpoint" in changed
    # pretrained=None: random initialisation, not an error
    changed = apply_cfg_options(cfg, {"pretrained": None})
    assert cfg.model.backbone.init_cfg is None and changed == ["model.backbone.init_cfg"]


def test_runner_reapplies_user_settings_from_the_config_file(tmp_path):
    """What DetRunner.from_cfg does for mmdet's own tools (which merge --cfg-options literally):
    fields still at the file's value follow a changed data_root / pretrained, fields set to another
    value stay; a backbone not made for the padded square is refused with both keys named."""
    from detection.user_settings import check_model_config, rebind_from_file
    cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py"))
    assert rebind_from_file(cfg) == []
    cfg.merge_from_dict({"data_root": "/d/coco", "pretrained": "/w/enc.pth", "test_evaluator.ann_file": "/t.json"})
    changed = rebind_from_file(cfg)
    assert cfg.data_root == "/d/coco/" and cfg.train_dataloader.dataset.data_root == "/d/coco/"
    assert cfg.val_evaluator.ann_file == "/d/coco/annotations/instances_val2017.json"
    assert cfg.test_evaluator.ann_file == "/t.json" and cfg.model.backbone.init_cfg.checkpoint == "/w/enc.pth"
    assert "model.backbone.init_cfg.checkpoint" in changed and "test_evaluator.ann_file" not in changed
    assert rebind_from_file(cfg) == []                                    # nothing left to follow
    check_model_config(cfg)
    cfg.model.data_preprocessor.square_size = 256
    with pytest.raises(ConfigError, match=r"model.backbone.img_size=64 but model.data_preprocessor.square_size=256"):
        check_model_config(cfg)


def test_vit_b_config_builds_and_runs_its_backbone():
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py"))
    backbone = MODELS.build(cfg.model.backbone)
    neck = MODELS.build(cfg.model.neck)
    from timm.models.vision_transformer import VisionTransformer
    ref = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
    # timm's ViT-B/16 encoder less what detection drops: cls token, its position slot, final norm
    expected = sum(p.numel() for p in ref.parameters()) - 768 - 768 - 2 * 768
    assert sum(p.numel() for n_, p in backbone.named_parameters() if "rel_pos" not in n_) == expected
    with torch.no_grad():
        feats = neck(backbone.eval()(torch.randn(1, 3, 64, 96)))
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]


# ---- Swin transfer (the papers' COCO table) ------------------------------------------------------------
SWIN_TINY = dict(embed_dims=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, drop_path_rate=0.0,
                 out_indices=(0, 1, 2, 3))


def test_swin_classifier_checkpoint_loads_into_mmdets_swin(tmp_path):
    """A timm Swin (as `python -m finetune` saves it) in mmdet's SwinTransformer: every stage's
    output equals timm's stage output (layer-normed, as mmdet's output norms start as identity)
    at 448 px, where every stage shifts its windows in both; the key report names what is left."""
    import timm
    from detection import TimmSwinTransformer
    from detection.cli import check_pretrained
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", img_size=448, embed_dim=24, depths=(2, 2, 2, 2),
                            num_heads=(1, 2, 2, 4), num_classes=5).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)      # LayerNorms and biases away from 1 / 0, tables non-zero
    sd = src.state_dict()
    torch.save({"model": sd, "model_ema": sd, "meta": {"kind": "classifier_finetune", "model_name": "swin_tiny"}},
               tmp_path / "swin.pth")
    swin = TimmSwinTransformer(**SWIN_TINY, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "swin.pth")))
    logger, records = _capture_logger("swin-report")
    MMLogger.get_instance("swin-current")                  # the current instance init_weights logs to
    from detection.swin import load_swin_checkpoint
    report = load_swin_checkpoint(swin, str(tmp_path / "swin.pth"), logger=logger)
    assert report.ok and len(report.loaded) == 117
    text = "\n".join(records)
    for line in ("117 tensors loaded", "timm layout", "expected miss, classification head: 2 key(s)",
                 "expected miss, output norm of a stage (detection-only, identity init): 8 key(s)"):
        assert line in text, line
    swin.eval()
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ref = src.forward_intermediates(x, intermediates_only=True)
        outs = swin(x)
    for r, o in zip(ref, outs):
        r = F.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2]).permute(0, 3, 1, 2)
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)

    fresh = TimmSwinTransformer(**SWIN_TINY, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "swin.pth")))
    fresh.init_weights()                                       # mmengine's init path
    assert torch.equal(fresh.stages[1].downsample.reduction.weight, swin.stages[1].downsample.reduction.weight)

    with pytest.raises(CheckpointMismatchError, match=r"(?s)relative_position_bias_table: file \[169, 1\] vs "
                                                      r"backbone \[81, 1\].*window_size=7"):
        load_swin_checkpoint(TimmSwinTransformer(**{**SWIN_TINY, "window_size": 5}), str(tmp_path / "swin.pth"))
    cfg = Config.fromfile(str(CONFIGS / "retinanet_swin-t_1x_coco.py"))
    apply_cfg_options(cfg, {"pretrained": str(tmp_path / "swin.pth")})
    with pytest.raises(CheckpointMismatchError, match=r"does not fit the backbone TimmSwinTransformer\(embed_dims=96"):
        check_pretrained(cfg)                                   # before a run builds anything
    with pytest.raises(ValueError, match="drop convert_weights="):
        TimmSwinTransformer(**SWIN_TINY, convert_weights=True)


# Swin's geometry per size (timm's swin_{tiny,small,base}_patch4_window7_224, the checkpoints the
# configs load) and the drop path of Swin's own Cascade Mask R-CNN configs
# (SwinTransformer/Swin-Transformer-Object-Detection configs/swin/cascade_mask_rcnn_swin_{tiny,small,base}_
# patch4_window7_mstrain_480-800_giou_4conv1f_adamw_*_coco.py: 0.2 / 0.2 / 0.3)
SWIN_SIZES = {"t": ("swin_tiny_patch4_window7_224", 0.2), "s": ("swin_small_patch4_window7_224", 0.2),
              "b": ("swin_base_patch4_window7_224", 0.3)}


@pytest.mark.parametrize("name, detector", [("retinanet_swin-t_1x_coco", "RetinaNet"),
                                            ("cascade-mask-rcnn_swin-t_1x_coco", "CascadeRCNN"),
                                            ("cascade-mask-rcnn_swin-s_1x_coco", "CascadeRCNN"),
                                            ("cascade-mask-rcnn_swin-b_1x_coco", "CascadeRCNN")])
def test_swin_configs_are_the_papers_1x(name, detector):
    """ET++ Table 17's rows: the backbone geometry of timm's Swin (what `python -m finetune` trains
    and the configs load), mmdet's schedule_1x.py, AdamW lr 1e-4 / wd 0.05 (Swin's detection configs)."""
    import timm
    cfg = Config.fromfile(str(CONFIGS / f"{name}.py"))
    b = cfg.model.backbone
    timm_name, drop_path = SWIN_SIZES[name.split("swin-")[1][0]]
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False)
    depths = [len(stage.blocks) for stage in ref.layers]
    heads = [stage.blocks[0].attn.num_heads for stage in ref.layers]
    assert cfg.model.type == detector and b.type == "TimmSwinTransformer"
    width = ref.patch_embed.proj.out_channels
    assert (b.embed_dims, b.depths, b.num_heads, b.window_size, b.drop_path_rate) == (width, depths, heads,
                                                                                     7, drop_path)
    widths = [width * 2 ** i for i in range(4)]
    assert cfg.model.neck.in_channels == (widths if detector == "CascadeRCNN" else widths[1:])
    assert b.init_cfg == dict(type="Pretrained", checkpoint=cfg.pretrained)
    ref_1x = Config.fromfile(str(MMDET_1X))
    assert cfg.train_cfg.max_epochs == ref_1x.train_cfg.max_epochs
    assert cfg.param_scheduler[1].milestones == ref_1x.param_scheduler[1].milestones
    assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.auto_scale_lr.base_batch_size == ref_1x.auto_scale_lr.base_batch_size and cfg.runner_type == "DetRunner"
    if detector == "CascadeRCNN":
        head = cfg.model.roi_head.bbox_head[0]
        assert (head.num_shared_convs, head.num_shared_fcs, head.loss_bbox.type) == (4, 1, "GIoULoss")
        assert cfg.model.roi_head.type == "CascadeRoIHead"        # mmdet's, as the papers' (ConvNeXt's) code
    changed = apply_cfg_options(cfg, {"data_root": "/data/coco/", "pretrained": "/w/swin.pth"})
    assert cfg.model.backbone.init_cfg.checkpoint == "/w/swin.pth" and "val_evaluator.ann_file" in changed


# ---- demo data ----------------------------------------------------------------------------------
def test_demo_coco_set_is_deterministic_and_coco_like(demo_coco, tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    gen = _load_tool("make_demo_coco")
    again = gen.generate(str(tmp_path / "again"))
    for split in ("train", "val"):
        a = Path(demo_coco, "annotations", f"instances_{split}2017.json").read_bytes()
        assert a == Path(again, "annotations", f"instances_{split}2017.json").read_bytes()
        coco = COCO(str(Path(demo_coco, "annotations", f"instances_{split}2017.json")))
        imgs = coco.dataset["images"]
        for im in imgs[:5]:
            assert Path(demo_coco, f"{split}2017", im["file_name"]).read_bytes() == \
                Path(again, f"{split}2017", im["file_name"]).read_bytes()
        modes = {Image.open(Path(demo_coco, f"{split}2017", im["file_name"])).mode for im in imgs}
        assert modes == {"RGB", "L"}                               # grayscale JPEGs included
        assert any(not coco.getAnnIds(imgIds=[im["id"]]) for im in imgs)   # images without objects
        crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
        assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
        for a in crowd:   # uncompressed RLE, as COCO stores crowds: decodes to the recorded area / box
            rle = mask_utils.frPyObjects(a["segmentation"], *a["segmentation"]["size"])
            assert mask_utils.area(rle) == a["area"]
            assert np.allclose(mask_utils.toBbox(rle), a["bbox"])
        polys = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
        assert all(len(a["segmentation"][0]) >= 6 for a in polys)
        assert sorted(c["id"] for c in coco.dataset["categories"]) == [1, 3, 5]


def test_demo_coco_annotations_are_the_drawn_shapes(demo_coco):
    """Boxes and masks must be exactly where the shapes are, else the demo's AP means nothing: each
    polygon mask (decoded by pycocotools) covers pixels far from the background colour, the pixels
    outside every mask are background, and each box is its mask's extent."""
    from PIL import Image
    from pycocotools.coco import COCO
    coco = COCO(str(Path(demo_coco, "annotations", "instances_val2017.json")))
    checked = 0
    for im in coco.dataset["images"][:16]:
        arr = np.asarray(Image.open(Path(demo_coco, "val2017", im["file_name"])), np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        if arr.ndim != 3 or not anns:
            continue
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        near = np.zeros(arr.shape[:2], bool)      # every mask grown by one pixel (JPEG blurs the edges)
        for m in masks:
            for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                near |= np.roll(m, (dy, dx), axis=(0, 1))
        bg = np.median(arr[~near], axis=0)
        assert np.mean(np.abs(arr[~near] - bg).max(-1) < 48) > 0.97      # outside the masks: background
        for a, m in zip(anns, masks):
            inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
            if a["iscrowd"] or not inner.any():
                continue
            assert np.mean(np.abs(arr[inner] - bg).max(-1) > 64) > 0.97   # inside: the shape's colour
            ys, xs = np.nonzero(m)
            assert np.allclose(a["bbox"], [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1],
                               atol=1.0)
            checked += 1
    assert checked >= 10


def test_prediction_picture_draws_boxes_masks_and_labels_where_the_predictions_are(tmp_path):
    from PIL import Image
    from detection.visualize import PALETTE, draw_predictions
    Image.new("RGB", (20, 20), (0, 0, 0)).save(tmp_path / "a.png")
    mask = np.zeros((20, 20), bool)
    mask[12:16, 10:14] = True
    sample = {"img_path": str(tmp_path / "a.png"), "bboxes": np.array([[10.0, 12.0, 14.0, 16.0], [0, 0, 5, 5]]),
              "labels": np.array([1, 0]), "scores": np.array([0.9, 0.1]), "masks": np.stack([mask, mask])}
    path = draw_predictions([sample], ("square", "disc"), str(tmp_path / "p.png"), score_thr=0.3, scale=2)
    arr = np.asarray(Image.open(path))[4:-4, 4:-4]                # the tile inside a 4-pixel white frame
    assert arr.shape[:2] == (40, 40)
    assert tuple(arr[26, 24]) == tuple(c // 2 for c in PALETTE[1])   # inside the mask: half-tinted in the class colour
    assert tuple(arr[32, 24]) == PALETTE[1]                        # the box's bottom edge (y = 16 x 2)
    assert tuple(arr[36, 4]) == (0, 0, 0) and tuple(arr[4, 4]) == (0, 0, 0)   # the 0.1-score one is not drawn
    assert arr[12:24, 20:40].any()                                 # its label above the box
    with pytest.raises(ValueError, match="no predictions"):
        draw_predictions([], ("a",), str(tmp_path / "q.png"))


def _snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes): what must survive a refused call."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def users_coco(tmp_path):
    """The reported folder: a real image, the user's instances_train2017.json and a note, no
    instances_val2017.json (what made the old generator replace it)."""
    from PIL import Image
    folder = tmp_path / "mycoco"
    (folder / "annotations").mkdir(parents=True)
    (folder / "train2017").mkdir()
    Image.new("RGB", (32, 24), (120, 30, 60)).save(folder / "train2017" / "000000000139.jpg")
    (folder / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"info": {"description": "COCO 2017 Dataset"}, "images": [], "annotations": [], "categories": []}))
    (folder / "precious.txt").write_text("do not lose me\n")
    return folder


def test_demo_coco_generator_refuses_a_users_folder(users_coco, tmp_path):
    import subprocess
    from engine.data import DataError
    gen = _load_tool("make_demo_coco")
    before = _snapshot(users_coco)
    for force in (False, True):
        with pytest.raises(DataError, match=f"OUT '{users_coco}' exists and is not a generated demo COCO set "
                                            r"\(it holds 3 entries: 'annotations', 'precious.txt', 'train2017'"):
            gen.generate(str(users_coco), force=force)
    with pytest.raises(DataError, match=f"data_root '{users_coco}' exists .* but the demo config \\(demo_coco = "
                                        "True\\) would generate one there; point data_root at a folder that does "
                                        "not exist yet"):
        gen.status(str(users_coco) + "/", key="data_root")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="it is an empty folder"):
        gen.generate(str(empty))
    r = subprocess.run([sys.executable, "tools/make_demo_coco.py", str(users_coco), "--force"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: OUT '{users_coco}' exists and is not a generated"), \
        r.stderr[-2000:]
    assert _snapshot(users_coco) == before and empty.is_dir() and not any(empty.iterdir())
    assert sorted(os.listdir(tmp_path)) == ["empty", "mycoco"]          # no temporary folder left behind


def test_demo_coco_foreign_file_blocks_regeneration(tmp_path, monkeypatch, capsys):
    from engine.data import DataError
    from engine.generated import MARKER
    gen = _load_tool("make_demo_coco")
    monkeypatch.setattr(gen, "SPLITS", {"train": 3, "val": 2})       # a small set: the rules are the same
    target = tmp_path / "demo_coco"
    gen.generate(str(target))
    assert f"generating the synthetic demo COCO set in {target} (5 images)" in capsys.readouterr().out
    assert (target / MARKER).is_file() and gen.status(str(target)) == "ready"
    gen.generate(str(target), seed=1)                                  # another seed: regenerated in place
    assert "regenerating the synthetic demo COCO set" in capsys.readouterr().out
    assert json.loads((target / "annotations" / "instances_train2017.json").read_text())["info"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["demo_coco"]
    mine = target / "val2017" / "notes.txt"
    mine.write_text("mine")
    before = _snapshot(target)
    for call in (lambda: gen.generate(str(target), seed=1, force=True), lambda: gen.generate(str(target)),
                 lambda: gen.status(str(target))):
        with pytest.raises(DataError, match=f"is a demo COCO set the toolkit generated, but it also holds '{mine}'"):
            call()
    assert _snapshot(target) == before
    assert gen.generate(str(target), seed=1) == str(target) and _snapshot(target) == before   # ready: untouched


def _run_tool(*argv):
    import subprocess
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_det_train_demo_refuses_a_users_data_root_through_the_command_line(users_coco, tmp_path):
    """The reported command: a demo config pointed at a user's COCO folder. It ends with exit 2
    naming the folder before the model is built, in a dry run alike, and every file stays."""
    before = _snapshot(users_coco)
    argv = ["tools/det_train.py", DEMO_CFG, "--work-dir", tmp_path / "wd", "--cfg-options", f"data_root={users_coco}/"]
    real, dry = _run_tool(*argv), _run_tool(*argv, "--dry-run")
    for r in (real, dry):
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.startswith(f"error: data_root '{users_coco}' exists and is not a generated demo COCO set")
        assert "Traceback" not in r.stderr
    assert real.stderr == dry.stderr
    assert _snapshot(users_coco) == before and not (tmp_path / "wd").exists()


def test_det_dry_runs_reach_the_real_runs_verdict_on_demo_and_real_data(demo_encoder, demo_coco, ckpts, bad_files,
                                                                         tmp_path, capsys):
    train, test = _load_tool("det_train"), _load_tool("det_test")
    wd = tmp_path / "wd"
    # a demo config with a missing data_root: the dry run says what the real run would write, and writes nothing
    new = tmp_path / "typo" / "coco"
    argv = [DEMO_CFG, "--work-dir", str(wd), "--dry-run", "--cfg-options", f"data_root={new}/",
            f"pretrained={demo_encoder['encoder']}"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert (f"dry run: the real run would generate the synthetic demo COCO set in {new} (648 images): data_root is "
            "not the demo configs' own data/demo_coco/") in out
    assert f"pretrained {demo_encoder['encoder']}: fits the backbone" in out
    assert "dry run: the config, checkpoints and data check out; nothing was built or written" in out
    assert not (tmp_path / "typo").exists() and not wd.exists()
    # the demo set in place: kept as it is
    assert test.main([DEMO_CFG, bad_files["detector"], "--work-dir", str(wd), "--dry-run", "--cfg-options",
                      f"data_root={demo_coco}"]) == 0
    out = capsys.readouterr().out
    assert f"data_root {demo_coco.rstrip('/')}: the synthetic demo COCO set (demo_coco = True)" in out
    assert f"checkpoint {bad_files['detector']}: fits the detector" in out and not wd.exists()
    # a real-COCO config (no demo_coco) never generates: the files its dataloaders name must exist
    coco_cfg = str(CONFIGS / "retinanet_vit-b-mae_sfp_1x_coco.py")
    for tool, args in ((train, [coco_cfg]), (test, [coco_cfg, ckpts["pretrain"]])):
        opts = ["--work-dir", str(wd), "--cfg-options", f"data_root={tmp_path}/coco/"]
        dry, real = tool.main([*args, *opts, "--dry-run"]), None
        dry_err = capsys.readouterr().err
        real = tool.main([*args, *opts])
        assert dry == real == 2 and capsys.readouterr().err == dry_err
        assert dry_err.startswith(f"error: {'train' if tool is train else 'test'}_dataloader.dataset.ann_file "
                                  f"'{tmp_path}/coco/annotations/instances_"), dry_err
    assert not (tmp_path / "coco").exists() and not wd.exists()
    # COCO-format data of the user's (the demo config with demo_coco=False): the dry run names what it reads
    root = demo_coco.rstrip("/")
    assert train.main([DEMO_CFG, "--work-dir", str(wd), "--dry-run", "--cfg-options", f"data_root={demo_coco}",
                       "demo_coco=False", f"pretrained={demo_encoder['encoder']}"]) == 0
    out = capsys.readouterr().out
    assert (f"train_dataloader: annotations {root}/annotations/instances_train2017.json, images {root}/train2017/"
            in out and f"val_dataloader: annotations {root}/annotations/instances_val2017.json" in out), out
    assert train.main([DEMO_CFG, "--work-dir", str(wd), "--dry-run", "--cfg-options", f"data_root={demo_coco}",
                       "demo_coco=False", "pretrained=/nowhere/encoder.pth"]) == 2   # data fine; then the checkpoint
    assert "pretrained '/nowhere/encoder.pth' does not exist" in capsys.readouterr().err
    assert not wd.exists()


def test_data_path_and_coco_metric_score_ground_truth_as_perfect(demo_coco):
    """The demo config's dataset (grayscale JPEGs, crowd RLE masks, images without objects) through
    mmdet's loading and CocoMetric: ground truth given back as predictions scores AP 1.0 for boxes
    and masks (pycocotools), and dropping half of them lowers it. Crowds must come out as ignored
    regions, not objects, or the first number would not be 1."""
    from mmdet.evaluation import CocoMetric
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIGS / "cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py"))
    ds_cfg = cfg.val_dataloader.dataset
    ds_cfg.data_root = demo_coco
    ds_cfg.pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                       dict(type="PackDetInputs")]         # no resize: predictions in original coordinates
    dataset = DATASETS.build(ds_cfg)
    ann = os.path.join(demo_coco, "annotations", "instances_val2017.json")
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["inputs"].shape[0] == 3 for s in samples)                     # grayscale -> 3 channels
    assert any(len(s["data_samples"].ignored_instances) for s in samples)      # crowds are ignored regions
    assert any(len(s["data_samples"].gt_instances) == 0 for s in samples)      # images without objects

    def score(keep_every):
        metric = CocoMetric(ann_file=ann, metric=["bbox", "segm"])
        metric.dataset_meta = dataset.metainfo
        for s in samples:
            gt = s["data_samples"].gt_instances[::keep_every]
            n = len(gt)
            metric.process({}, [dict(img_id=s["data_samples"].img_id, ori_shape=s["data_samples"].ori_shape,
                                     pred_instances=dict(bboxes=gt.bboxes.tensor, labels=gt.labels,
                                                         scores=torch.ones(n),
                                                         masks=torch.from_numpy(gt.masks.to_ndarray()).bool()))])
        return metric.evaluate(len(samples))

    perfect = score(1)
    assert perfect["coco/bbox_mAP"] == pytest.approx(1.0) and perfect["coco/segm_mAP"] == pytest.approx(1.0)
    half = score(2)
    assert half["coco/bbox_mAP"] < 0.9 and half["coco/segm_mAP"] < 0.9


# ---- training, evaluation, resume (real mmengine Runner, mmcv ops, CocoMetric) -----------------------
def _opts(demo_coco, pretrained, **extra):
    # a visualizer of its own per run: mmengine keeps one instance per name in the process
    opts = [f"data_root={demo_coco}", f"pretrained={pretrained}", "default_hooks.logger.interval=1",
            f"visualizer.name=vis{next(_RUN_IDS)}",
            "train_dataloader.dataset.indices=8", "val_dataloader.dataset.indices=6",
            "test_dataloader.dataset.indices=6", "log_level=WARNING",
            # the demo configs' batch of 8 would make these 8 images a single step
            "train_dataloader.batch_size=2", "val_dataloader.batch_size=2", "test_dataloader.batch_size=2"]
    return opts + [f"{k}={v}" for k, v in extra.items()]


_RUN_IDS = itertools.count()


def _scalars(work_dir):
    rows = []
    for path in sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))):
        with open(path) as f:
            rows.append([json.loads(line) for line in f if line.strip()])
    return rows


def test_retinanet_demo_trains_evaluates_and_resumes(demo_encoder, demo_coco, tmp_path):
    train = _load_tool("det_train")
    cfg = str(CONFIGS / "retinanet_vit-tiny-mae_sfp_demo.py")
    wd = str(tmp_path / "retina")
    # "interrupted" run: one epoch of the two, then stopped
    first = train.run(train.parse_args([cfg, "--work-dir", wd, "--cfg-options",
                                        *_opts(demo_coco, demo_encoder["encoder"], **{"train_cfg.max_epochs": 1})]))
    n = first["runner"].iter
    assert n >= 3 and first["runner"].epoch == 1
    ckpt = os.path.join(wd, "epoch_1.pth")
    # today's torch.load default (weights_only=True) refuses mmengine checkpoints ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    # ... our scoped allowlist reads them, still weights-only
    with mmengine_checkpoint_globals():
        meta = torch.load(ckpt)["meta"]
    assert (meta["epoch"], meta["iter"]) == (1, n)

    second = train.run(train.parse_args([cfg, "--work-dir", wd, "--resume", "--cfg-options",
                                         *_opts(demo_coco, demo_encoder["encoder"], **{"train_cfg.max_epochs": 2,
                                                                              "train_cfg.val_interval": 2})]))
    runner = second["runner"]
    assert (runner.epoch, runner.iter) == (2, 2 * n)
    logs = _scalars(wd)
    assert len(logs) == 2
    first_iters = [r["iter"] for r in logs[0] if "loss" in r]
    second_iters = [r["iter"] for r in logs[1] if "loss" in r]
    assert first_iters == list(range(1, n + 1)) and second_iters == list(range(n + 1, 2 * n + 1))
    # the optimizer state came back: AdamW has taken 2n steps for every parameter
    opt = runner.optim_wrapper.optimizer
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {2.0 * n}
    # layer-wise scales survive warm-up and the LR steps
    lrs = {g["layer_id"]: g["lr"] / g["lr_scale"] for g in opt.param_groups}
    assert max(lrs.values()) == pytest.approx(min(lrs.values()))

    metrics = second["metrics"]
    for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75", "coco/bbox_mAP_s"):
        assert -1.0 <= metrics[key] <= 1.0
    assert "bbox" in coco_table(metrics)


def test_cascade_mask_rcnn_demo_trains_and_det_test_reproduces_its_metrics(demo_encoder, demo_coco, tmp_path):
    train, test = _load_tool("det_train"), _load_tool("det_test")
    cfg = str(CONFIGS / "cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py")
    wd = str(tmp_path / "cascade")
    out = train.run(train.parse_args([cfg, "--work-dir", wd, "--cfg-options",
                                      *_opts(demo_coco, demo_encoder["pretrain"], **{"train_cfg.max_epochs": 1})]))
    m = out["metrics"]
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/segm_mAP_50"):
        assert -1.0 <= m[key] <= 1.0
    assert any("loss_mask" in k for r in _scalars(wd)[0] for k in r)
    res = test.run(test.parse_args([cfg, os.path.join(wd, "epoch_1.pth"), "--work-dir", str(tmp_path / "test"),
                                    "--cfg-options", *_opts(demo_coco, "/nonexistent/unused.pth")]))
    assert {k: v for k, v in res["metrics"].items() if k.startswith("coco/")} == \
        {k: v for k, v in m.items() if k.startswith("coco/")}
    from PIL import Image
    assert res["picture"] == str(tmp_path / "test" / "predictions.png")
    assert Image.open(res["picture"]).width == 4 * (4 * 64 + 4) + 4        # 4 columns of 4x enlarged images
    # a file the runner itself cannot use (as mmdet's own tools load_from / resume): CheckpointError at the source
    runner = res["runner"]
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint '.*junk.pth' is not a PyTorch checkpoint: it is a text"):
        runner.load_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {"fc.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="holds none of the detector's weights: none of its 1 tensor"):
        runner.load_checkpoint(str(tmp_path / "other.pth"))
    runner.checkpoint_label = None                                 # named by the runner's own setting
    torch.save({"state_dict": runner.model.state_dict()}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="^resume '.*weights.pth' holds no training state to resume: it lacks "
                                              "meta.epoch, meta.iter"):
        runner.resume(str(tmp_path / "weights.pth"))


def test_entry_points_report_bad_input(capsys, tmp_path):
    train, test = _load_tool("det_train"), _load_tool("det_test")
    assert train.main([str(tmp_path / "missing.py")]) == 2
    assert "config" in capsys.readouterr().err
    assert test.main([str(CONFIGS / "retinanet_vit-tiny-mae_sfp_demo.py"), str(tmp_path / "none.pth")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args([])
    import subprocess
    r = subprocess.run(["bash", str(ROOT / "tools" / "det_dist_train.sh"), "cfg.py", "two"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage:" in r.stderr and "NGPUS: a positive integer" in r.stderr


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user may name by mistake: not checkpoints, broken ones, and checkpoints of another kind."""
    d = tmp_path_factory.mktemp("bad_files")
    (d / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "notes.txt").write_text("epoch 12 looked best, use that one\n")
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}}, d / "whole.pth")
    data = (d / "whole.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[:len(data) // 2])               # an interrupted copy
    # a detector checkpoint's layout (mmengine: state_dict + meta) with the demo backbone's patch embedding
    torch.save({"state_dict": {"backbone.patch_embed.proj.weight": torch.zeros(192, 3, 4, 4)},
                "meta": {"epoch": 1, "iter": 3}}, d / "detector.pth")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, d / "other_model.pth")
    (d / "broken_config.py").write_text("model = dict(\n")
    return {p.stem: str(p) for p in d.iterdir()} | {"folder": str(d), "missing": str(d / "nowhere.pth")}


DEMO_CFG = str(CONFIGS / "retinanet_vit-tiny-mae_sfp_demo.py")


@pytest.mark.parametrize("tool, args, path, expected", [
    ("det_train", ["pretrained={random}"], "random", "pretrained '{}' is not a PyTorch checkpoint: it is binary data"),
    ("det_train", ["pretrained={notes}"], "notes", "pretrained '{}' is not a PyTorch checkpoint: it is a text file"),
    ("det_train", ["pretrained={missing}"], "missing", "pretrained '{}' does not exist: set `pretrained`"),
    ("det_train", ["pretrained={detector}"], "detector", "pretrained '{}' does not fit the backbone PlainViT"),
    ("det_train", ["--resume", "{random}"], "random", "--resume '{}' is not a PyTorch checkpoint"),
    ("det_train", ["--resume", "{truncated}"], "truncated", "--resume '{}' is not a readable PyTorch checkpoint"),
    ("det_train", ["--resume", "{encoder}"], "encoder", "--resume '{}' holds no training state to resume"),
    ("det_train", ["--resume", "{missing}"], "missing", "--resume '{}' does not exist"),
    ("det_train", ["config={missing}"], "missing", "config '{}' does not exist; expected an MMDetection config"),
    ("det_train", ["config={broken_config}"], "broken_config", "config '{}' is not valid Python: '(' was never"),
    ("det_test", ["config={detector}", DEMO_CFG], "detector", "config '{}' is a .pth file; expected an MMDetection"),
    ("det_test", ["{random}"], "random", "checkpoint '{}' is not a PyTorch checkpoint: it is binary data"),
    ("det_test", ["{notes}"], "notes", "checkpoint '{}' is not a PyTorch checkpoint: it is a text file"),
    ("det_test", ["{missing}"], "missing", "checkpoint '{}' does not exist; expected a detector checkpoint"),
    ("det_test", ["{folder}"], "folder", "checkpoint '{}' is a folder"),
    ("det_test", ["{encoder}"], "encoder", "checkpoint '{}' holds no weights"),
    ("det_test", ["{other_model}"], "other_model", "checkpoint '{}' holds none of the detector's weights"),
])
def test_entry_points_report_unusable_files_before_building_anything(tool, args, path, expected, bad_files,
                                                                    demo_encoder, tmp_path, capsys):
    """A file the user named that cannot be used: exit code 2 and one message naming the setting,
    the file, what it is and what is expected; no traceback, and nothing built (no work dir)."""
    files = {**bad_files, "encoder": demo_encoder["encoder"]}
    args = [a.format(**files) for a in args]
    config = DEMO_CFG
    if args[0].startswith("config="):
        config, args = args[0][len("config="):], args[1:]
    wd = tmp_path / "wd"
    if tool == "det_train":
        options = [a for a in args if "=" in a]
        argv = [config, *[a for a in args if "=" not in a], "--work-dir", str(wd), "--cfg-options",
                f"data_root={tmp_path}/coco/", *(options or [f"pretrained={demo_encoder['encoder']}"])]
    else:
        argv = [config, *args, "--work-dir", str(wd), "--cfg-options", f"data_root={tmp_path}/coco/"]
    assert _load_tool(tool).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected.format(files[path]) in err, err
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert not wd.exists() and not (tmp_path / "coco").exists()      # failed before the runner and the data


def test_entry_points_keep_the_traceback_of_a_bug(monkeypatch):
    """Only user errors become exit code 2: anything else (a bug) propagates with its traceback."""
    for name in ("det_train", "det_test"):
        tool = _load_tool(name)

        def bug(args):
            raise RuntimeError("a bug")
        monkeypatch.setattr(tool, "run", bug)
        with pytest.raises(RuntimeError, match="a bug"):
            tool.main([DEMO_CFG] + (["ckpt.pth"] if name == "det_test" else []))


def test_command_lines_report_user_errors_without_traceback(bad_files, tmp_path):
    """The reported cases through the real command lines: a timm ViT-S state dict as `pretrained`
    of the ViT-tiny demo (the key report, abridged, names the architecture of the file) and a file
    of random bytes as the checkpoint to test."""
    import subprocess

    import timm
    vit_s = tmp_path / "vit_small_patch16_224.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), vit_s)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--work-dir", str(tmp_path / "wd"), "--cfg-options", f"data_root={tmp_path}/coco/"]
    r = subprocess.run([sys.executable, "tools/det_train.py", DEMO_CFG, *common, f"pretrained={vit_s}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    assert (f"pretrained '{vit_s}' does not fit the backbone PlainViT(img_size=64, pretrain_img_size=48, "
            "patch_size=4, embed_dim=192") in r.stderr
    for line in ("0 of the file's 152 tensors fit the backbone", "ERROR keys the backbone does not have: 96",
                 "ERROR shape mismatch patch_embed.proj.weight: file [384, 3, 16, 16] vs backbone [192, 3, 4, 4]",
                 "more shape mismatches", "hint: the file has 12 blocks, the backbone depth=4",
                 "hint: the file has patch size 16 and width 384", "expected backbone weights"):
        assert line in r.stderr, line
    assert len(r.stderr.splitlines()) < 15                       # abridged: not a line per mismatched key
    assert not (tmp_path / "wd").exists()

    r = subprocess.run([sys.executable, "tools/det_test.py", DEMO_CFG, bad_files["random"], *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: checkpoint '{bad_files['random']}' is not a PyTorch checkpoint")
    assert "expected a detector checkpoint written by tools/det_train.py" in r.stderr


def test_checkpoint_allowlist_stays_narrow(tmp_path):
    """The resume allowlist maps ``getattr`` to HistoryBuffer's statistic methods only."""
    class Sneaky:
        def __reduce__(self):
            return (getattr, ("text", "upper"))
    torch.save({"x": Sneaky()}, tmp_path / "sneaky.pth")
    with mmengine_checkpoint_globals(), pytest.raises(pickle.UnpicklingError, match="only HistoryBuffer"):
        torch.load(tmp_path / "sneaky.pth")
    with pytest.raises(pickle.UnpicklingError):     # and nothing changes outside the block
        torch.load(tmp_path / "sneaky.pth")


def test_configs_run_and_resume_with_mmdets_own_train_script(demo_encoder, demo_coco, tmp_path):
    """mmdet's tools/train.py imports the plug-in through custom_imports and, through the configs'
    runner_type (DetRunner), follows `--cfg-options data_root=... pretrained=...` into the fields
    derived from them (the config's defaults point nowhere: the run only works if they follow)
    and resumes with weights-only loading too."""
    import subprocess

    import mmdet
    script = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    assert script.is_file(), script
    keys = [f"data_root={demo_coco}", f"pretrained={demo_encoder['official_encoder']}",
            "train_dataloader.dataset.indices=6", "val_dataloader.dataset.indices=4"]
    wd = tmp_path / "mmdet_script"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def train(*extra):
        r = subprocess.run([sys.executable, str(script), str(CONFIGS / "retinanet_vit-tiny-mae_sfp_demo.py"),
                            "--work-dir", str(wd), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout + r.stderr

    out = train("--cfg-options", *keys, "train_cfg.max_epochs=1")
    assert "data_root / pretrained / image_size re-applied to: train_dataloader.dataset.data_root" in out
    assert "model.backbone.init_cfg.checkpoint" in out and demo_encoder["official_encoder"] in out
    with mmengine_checkpoint_globals():
        n = torch.load(wd / "epoch_1.pth")["meta"]["iter"]
    out = train("--resume", "--cfg-options", *keys, "train_cfg.max_epochs=2")
    assert "resumed epoch: 1, iter: %d" % n in out
    with mmengine_checkpoint_globals():
        meta = torch.load(wd / "epoch_2.pth")["meta"]
    assert (meta["epoch"], meta["iter"]) == (2, 2 * n)
    assert "coco/bbox_mAP" in out


def test_memory_estimate_counts_parameters_and_optimizer_state():
    """The tool behind detection/README.md's memory estimate, on the tiny demo detector."""
    from detection.memory_estimate import GIB, estimate
    from mmdet.registry import MODELS
    cfg = CONFIGS / "cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py"
    res = estimate(str(cfg), batch=1, height=48, width=64, objects=3)
    model_cfg = Config.fromfile(str(cfg)).model
    model_cfg.backbone.init_cfg = None
    n = sum(p.numel() for p in MODELS.build(model_cfg).parameters())
    assert res["params_M"] == pytest.approx(n / 1e6)
    assert res["Parameter"] == pytest.approx(4 * n / GIB, rel=1e-3)           # fp32 weights
    assert res["Optstate"] == pytest.approx(2 * 4 * n / GIB, rel=0.01)        # AdamW: 2 moments (+ steps)
    assert res["Total"] > res["Parameter"] + res["Optstate"]


def test_det_train_refuses_a_work_dir_a_live_run_holds(demo_encoder, demo_coco, tmp_path, capsys):
    """One live run per work dir: a second det_train.py into it exits 2 naming the holder, before
    anything is built or written there."""
    from engine.stops import RunLock

    train = _load_tool("det_train")
    wd = tmp_path / "wd"
    holder = RunLock(str(wd), "the first detection run").acquire()      # another open file: the flock conflicts
    try:
        assert train.main([DEMO_CFG, "--work-dir", str(wd), "--cfg-options", f"data_root={demo_coco}",
                           f"pretrained={demo_encoder['encoder']}"]) == 2
        err = capsys.readouterr().err
        assert f"{wd} is in use by a live run (pid {os.getpid()}" in err and "the first detection run" in err
        assert sorted(os.listdir(wd)) == ["run.lock"]
    finally:
        holder.release()
