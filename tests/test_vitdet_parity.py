"""Parity of the detection backbone + simple feature pyramid with ViTDet (detectron2).

The reference below is written here from the formulas of detectron2's
``modeling/backbone/vit.py`` and ``utils.py`` (ViT, window partition with zero padding, decomposed
relative position bias with linear resampling of the tables, bicubic resampling of the
absolute table from the pretraining grid with the cls slot, SimpleFeaturePyramid with its
channel LayerNorm, LastLevelMaxPool / LastLevelP6P7): plain tensor functions on a dict of
weights, nothing imported from ``detection``. The same weights go into ``PlainViT`` and
``SimpleFeaturePyramid``; a 1024x1024 input (the grid the relative tables are made for: 2*64-1
entries in global blocks, 2*14-1 in window blocks) and a non-square 768x1024 one (tables and
position grid resampled, windows padded) must give the same maps to 1e-5. Both run in float64,
so what is compared is the arithmetic, not float32 rounding (the pyramid's finest level differs
by up to 2e-5 in float32 from summation order alone); the one float32 step left is timm's
resampling of the position table (the differences it leaves are below 6e-6 here).
"""
import math

import pytest

pytest.importorskip("mmdet")
pytestmark = pytest.mark.det

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from detection import PlainViT, SimpleFeaturePyramid  # noqa: E402

# tiny width / depth, ViT-B/16's geometry otherwise: pretraining at 224, detection input 1024
DIM, DEPTH, HEADS, PATCH, WINDOW, PRETRAIN, INPUT = 32, 4, 2, 16, 14, 224, 1024
GLOBAL = (1, 3)
OUT = 16


# ---- reference: detectron2's ViTDet formulas -------------------------------------------------------
def ref_layer_norm(x, w, b, eps=1e-6):
    """Over the last axis (torch's LayerNorm in the ViT blocks)."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_channel_norm(x, w, b, eps=1e-6):
    """detectron2's LayerNorm for [N, C, H, W]: statistics over the channels."""
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - mu) / torch.sqrt(var + eps)) + b[:, None, None]


def ref_rel_table(q_size, k_size, table):
    """The [q, k, C] embeddings of the offsets between query and key rows (or columns): the table
    is resampled linearly to 2*max(q, k)-1 entries when it has another length."""
    n = 2 * max(q_size, k_size) - 1
    if table.shape[0] != n:
        table = F.interpolate(table.t()[None], size=n, mode="linear")[0].t()
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def ref_attention(x, w, prefix, use_rel):
    """Multi-head attention over [B, H, W, C] with the decomposed relative position bias added to
    the logits (computed with the unscaled queries)."""
    B, H, W, C = x.shape
    hd = C // HEADS
    qkv = (x.reshape(B, H * W, C) @ w[prefix + "qkv.weight"].t() + w[prefix + "qkv.bias"])
    qkv = qkv.reshape(B, H * W, 3, HEADS, hd).permute(2, 0, 3, 1, 4).reshape(3, B * HEADS, H * W, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * hd ** -0.5) @ k.transpose(-2, -1)
    if use_rel:
        Rh = ref_rel_table(H, H, w[prefix + "rel_pos_h"])
        Rw = ref_rel_table(W, W, w[prefix + "rel_pos_w"])
        rq = q.reshape(B * HEADS, H, W, hd)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, Rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, Rw)
        logits = (logits.view(B * HEADS, H, W, H, W) + rel_h[:, :, :, :, None]
                  + rel_w[:, :, :, None, :]).view(B * HEADS, H * W, H * W)
    out = logits.softmax(-1) @ v
    out = out.view(B, HEADS, H, W, hd).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
    return out @ w[prefix + "proj.weight"].t() + w[prefix + "proj.bias"]


def ref_block(x, w, i, window):
    p = f"blocks.{i}."
    shortcut = x
    y = ref_layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
    if window:
        B, H, W, C = y.shape
        ph, pw = (window - H % window) % window, (window - W % window) % window
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        y = y.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(-1, window, window, C)
        y = ref_attention(y, w, p + "attn.", True)
        y = y.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(B, Hp, Wp, C)[:, :H, :W]
    else:
        y = ref_attention(y, w, p + "attn.", True)
    x = shortcut + y
    h = ref_layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
    h = F.gelu(h @ w[p + "mlp.fc1.weight"].t() + w[p + "mlp.fc1.bias"])
    return x + (h @ w[p + "mlp.fc2.weight"].t() + w[p + "mlp.fc2.bias"])


def ref_vit(img, w):
    x = F.conv2d(img, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH).permute(0, 2, 3, 1)
    h, wd = x.shape[1:3]
    pos = w["pos_embed_with_cls"][:, 1:]                                   # the cls slot is dropped
    side = int(math.sqrt(pos.shape[1]))
    if (side, side) != (h, wd):
        pos = F.interpolate(pos.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(h, wd), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1)
    x = x + pos.reshape(1, h, wd, -1)
    for i in range(DEPTH):
        x = ref_block(x, w, i, 0 if i in GLOBAL else WINDOW)
    return x.permute(0, 3, 1, 2)


def ref_sfp(feat, w, scale_factors, top):
    """ViTDet's SimpleFeaturePyramid (norm 'LN', no conv biases) with LastLevelMaxPool ('maxpool')
    or LastLevelP6P7 on p5 ('p6p7')."""
    outs = []
    for j, scale in enumerate(scale_factors):
        p = f"stage{j}."
        x = feat
        if scale == 4.0:
            x = F.conv_transpose2d(x, w[p + "up1.weight"], w[p + "up1.bias"], stride=2)
            x = F.gelu(ref_channel_norm(x, w[p + "up1_norm.weight"], w[p + "up1_norm.bias"]))
            x = F.conv_transpose2d(x, w[p + "up2.weight"], w[p + "up2.bias"], stride=2)
        elif scale == 2.0:
            x = F.conv_transpose2d(x, w[p + "up1.weight"], w[p + "up1.bias"], stride=2)
        elif scale == 0.5:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        x = ref_channel_norm(F.conv2d(x, w[p + "lateral.weight"]), w[p + "lateral_norm.weight"],
                             w[p + "lateral_norm.bias"])
        x = ref_channel_norm(F.conv2d(x, w[p + "output.weight"], padding=1), w[p + "output_norm.weight"],
                             w[p + "output_norm.bias"])
        outs.append(x)
    if top == "maxpool":
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
    else:
        p6 = F.conv2d(outs[-1], w["p6.weight"], w["p6.bias"], stride=2, padding=1)
        outs += [p6, F.conv2d(F.relu(p6), w["p7.weight"], w["p7.bias"], stride=2, padding=1)]
    return outs


# ---- the same weights for both ------------------------------------------------------------------------
def random_weights(scale_factors, top, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    grid = PRETRAIN // PATCH
    w = {"patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH, std=0.02), "patch_embed.proj.bias": r(DIM),
         "pos_embed_with_cls": r(1, 1 + grid * grid, DIM, std=0.1)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        n = 2 * (INPUT // PATCH if i in GLOBAL else WINDOW) - 1
        w.update({p + "norm1.weight": 1 + r(DIM), p + "norm1.bias": r(DIM), p + "norm2.weight": 1 + r(DIM),
                  p + "norm2.bias": r(DIM), p + "attn.qkv.weight": r(3 * DIM, DIM, std=0.2),
                  p + "attn.qkv.bias": r(3 * DIM), p + "attn.proj.weight": r(DIM, DIM, std=0.2),
                  p + "attn.proj.bias": r(DIM), p + "attn.rel_pos_h": r(n, DIM // HEADS, std=0.5),
                  p + "attn.rel_pos_w": r(n, DIM // HEADS, std=0.5),
                  p + "mlp.fc1.weight": r(4 * DIM, DIM, std=0.1), p + "mlp.fc1.bias": r(4 * DIM),
                  p + "mlp.fc2.weight": r(DIM, 4 * DIM, std=0.1), p + "mlp.fc2.bias": r(DIM)})
    for j, scale in enumerate(scale_factors):
        p = f"stage{j}."
        dim = DIM
        if scale >= 2.0:
            w.update({p + "up1.weight": r(DIM, DIM // 2, 2, 2, std=0.2), p + "up1.bias": r(DIM // 2)})
            dim = DIM // 2
        if scale == 4.0:
            w.update({p + "up1_norm.weight": 1 + r(DIM // 2), p + "up1_norm.bias": r(DIM // 2),
                      p + "up2.weight": r(DIM // 2, DIM // 4, 2, 2, std=0.2), p + "up2.bias": r(DIM // 4)})
            dim = DIM // 4
        w.update({p + "lateral.weight": r(OUT, dim, 1, 1, std=0.2), p + "lateral_norm.weight": 1 + r(OUT),
                  p + "lateral_norm.bias": r(OUT), p + "output.weight": r(OUT, OUT, 3, 3, std=0.1),
                  p + "output_norm.weight": 1 + r(OUT), p + "output_norm.bias": r(OUT)})
    if top == "p6p7":
        w.update({"p6.weight": r(OUT, OUT, 3, 3, std=0.1), "p6.bias": r(OUT),
                  "p7.weight": r(OUT, OUT, 3, 3, std=0.1), "p7.bias": r(OUT)})
    return w


def build_ours(w, scale_factors, top):
    """PlainViT + SimpleFeaturePyramid holding the reference weights (our parameter names)."""
    vit = PlainViT(img_size=INPUT, pretrain_img_size=PRETRAIN, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                   num_heads=HEADS, window_size=WINDOW, global_attn_indexes=GLOBAL, use_rel_pos=True,
                   drop_path_rate=0.0).double().eval()
    sd = {k: v for k, v in w.items() if k.startswith(("patch_embed.", "blocks."))}
    sd["pos_embed"] = w["pos_embed_with_cls"][:, 1:]
    vit.load_state_dict(sd, strict=True)

    strides = [int(PATCH / s) for s in scale_factors]
    neck = SimpleFeaturePyramid(DIM, OUT, backbone_stride=PATCH, strides=strides,
                                extra_levels=1 if top == "maxpool" else 2,
                                extra_type="maxpool" if top == "maxpool" else "conv").double().eval()
    nsd = {}
    for j, scale in enumerate(scale_factors):
        p = f"stage{j}."
        if scale == 4.0:
            nsd.update({f"scales.{j}.0.weight": w[p + "up1.weight"], f"scales.{j}.0.bias": w[p + "up1.bias"],
                        f"scales.{j}.1.weight": w[p + "up1_norm.weight"], f"scales.{j}.1.bias": w[p + "up1_norm.bias"],
                        f"scales.{j}.3.weight": w[p + "up2.weight"], f"scales.{j}.3.bias": w[p + "up2.bias"]})
        elif scale == 2.0:
            nsd.update({f"scales.{j}.0.weight": w[p + "up1.weight"], f"scales.{j}.0.bias": w[p + "up1.bias"]})
        for k, name in enumerate(("lateral", "lateral_norm", "output", "output_norm")):
            nsd[f"outputs.{j}.{k}.weight"] = w[p + name + ".weight"]
            if name.endswith("norm"):
                nsd[f"outputs.{j}.{k}.bias"] = w[p + name + ".bias"]
    if top == "p6p7":
        nsd.update({"extra_convs.0.weight": w["p6.weight"], "extra_convs.0.bias": w["p6.bias"],
                    "extra_convs.1.weight": w["p7.weight"], "extra_convs.1.bias": w["p7.bias"]})
    neck.load_state_dict(nsd, strict=True)
    return vit, neck


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("hw, scale_factors, top", [
    ((1024, 1024), (4.0, 2.0, 1.0, 0.5), "maxpool"),   # Cascade Mask R-CNN: P2-P5 + P6
    ((768, 1024), (2.0, 1.0, 0.5), "p6p7"),           # RetinaNet: P3-P5 + P6/P7, a non-square input
])
def test_backbone_and_pyramid_equal_vitdet_formulas(hw, scale_factors, top):
    w = random_weights(scale_factors, top)
    vit, neck = build_ours(w, scale_factors, top)
    img = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref_feat = ref_vit(img, w)
        ref_levels = ref_sfp(ref_feat, w, scale_factors, top)
        (feat,) = vit(img)
        levels = neck((feat,))
    assert feat.shape == (1, DIM, hw[0] // PATCH, hw[1] // PATCH)
    torch.testing.assert_close(feat, ref_feat, rtol=0, atol=1e-5)
    assert len(levels) == len(ref_levels)
    for ours, ref in zip(levels, ref_levels):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # the reference is sensitive to what is compared: the relative tables and the position grid matter
    w2 = dict(w)
    w2["blocks.1.attn.rel_pos_h"] = w["blocks.1.attn.rel_pos_h"].flip(0)
    with torch.no_grad():
        assert (ref_vit(img, w2) - ref_feat).abs().max() > 1e-3


def test_table_sizes_follow_the_two_sizes():
    """Global blocks: 2 * img_size / patch - 1 entries; window blocks 2 * window - 1; the absolute
    table keeps the pretraining grid (ViTDet at 1024 / 16 from 224: 127, 27, 14x14)."""
    vit = PlainViT(img_size=INPUT, pretrain_img_size=PRETRAIN, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                   num_heads=HEADS, window_size=WINDOW, global_attn_indexes=GLOBAL, use_rel_pos=True)
    sizes = [tuple(b.attn.rel_pos_h.shape) for b in vit.blocks]
    assert sizes == [(27, 16), (127, 16), (27, 16), (127, 16)]
    assert tuple(vit.pos_embed.shape) == (1, 14 * 14, DIM)


def test_pyramid_maps_are_contiguous_so_mmcv_roi_align_reads_them_right():
    """mmcv's RoIAlign reads its input as contiguous NCHW whatever its strides; timm's LayerNorm2d
    (the pyramid's last layer) returns a channels-last view. The pyramid hands out contiguous maps,
    and RoIAlign on them equals torchvision's stride-aware roi_align."""
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    sfp = SimpleFeaturePyramid(in_channels=16, out_channels=8, backbone_stride=4, strides=(4, 8), extra_levels=1).eval()
    with torch.no_grad():
        outs = sfp([torch.randn(2, 16, 12, 12)])
    rois = torch.tensor([[0, 4.0, 8.0, 38.0, 28.0], [1, 0.0, 0.0, 48.0, 48.0]])   # (image, x0, y0, x1, y1) in pixels
    for o, stride in zip(outs, (4, 8, 16)):
        assert o.is_contiguous()
        ours = RoIAlign((3, 3), spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)(o, rois)
        ref = roi_align(o, rois, (3, 3), 1.0 / stride, 2, True)
        assert torch.allclose(ours, ref, atol=1e-5)
    # the trap itself: the same values as a channels-last view give other RoI features
    view = outs[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(view, outs[0]) and not view.is_contiguous()
    bad = RoIAlign((3, 3), spatial_scale=0.25, sampling_ratio=2, aligned=True)(view, rois)
    assert not torch.allclose(bad, roi_align(outs[0], rois, (3, 3), 0.25, 2, True), atol=1e-3)
