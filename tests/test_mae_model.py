"""MAE model: official layout and numerics, grids at every curriculum size, pos-embed semantics, HOG."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efficienttrain.curriculum import get_curriculum
from pretrain.hog import HOGTarget
from pretrain.models_mae import ARCHS, create_mae

TINY = dict(embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


# ---- an independent reference written from the official MAE formulas -------------------------
def official_sincos(dim, gs, cls_token=True):
    """numpy transcription of mae/util/pos_embed.py get_2d_sincos_pos_embed."""
    def emb_1d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(gs, dtype=np.float32)
    grid_w = np.arange(gs, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, gs, gs])
    emb = np.concatenate([emb_1d(dim // 2, grid[0]), emb_1d(dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


def ref_block(x, sd, prefix, heads):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps=1e-6)

    def lin(t, name):
        return t @ sd[f"{prefix}{name}.weight"].T + sd[f"{prefix}{name}.bias"]

    B, N, C = x.shape
    h = ln(x, "norm1")
    qkv = lin(h, "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    x = x + lin(out, "attn.proj")
    h = ln(x, "norm2")
    h = lin(F.gelu(lin(h, "mlp.fc1")), "mlp.fc2")
    return x + h


def reference_mae(sd, imgs, noise, cfg, mask_ratio=0.75):
    p = cfg["patch_size"]
    N, _, H, W = imgs.shape
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:, :]
    L, D = x.shape[1:]
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1, :]).expand(N, -1, -1)
    x = torch.cat([cls, x], 1)
    for i in range(cfg["depth"]):
        x = ref_block(x, sd, f"blocks.{i}.", cfg["num_heads"])
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    mask_tokens = sd["mask_token"].repeat(N, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], 1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], 1) + sd["decoder_pos_embed"]
    for i in range(cfg["decoder_depth"]):
        x = ref_block(x, sd, f"decoder_blocks.{i}.", cfg["decoder_num_heads"])
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:, :]
    h, w = H // p, W // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(N, 3, h, p, w, p)).reshape(N, h * w, p * p * 3)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def test_matches_official_formulas_at_224():
    torch.manual_seed(0)
    cfg = dict(patch_size=16, **TINY)
    model = create_mae("mae_vit_base_patch16", img_size=224, target="norm_pixel", **TINY).eval()
    imgs = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_mae(model.state_dict(), imgs, noise, cfg)
    assert torch.equal(mask, ref_mask) and int(mask.sum()) == 2 * 147
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


def test_pos_embed_buffers_equal_official_sincos():
    model = create_mae("mae_vit_base_patch16", img_size=224, **TINY)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), official_sincos(32, 14), atol=1e-6)
    np.testing.assert_allclose(model.decoder_pos_embed[0].numpy(), official_sincos(16, 14), atol=1e-6)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_state_dict_is_the_official_layout():
    model = create_mae("mae_vit_base_patch16")
    sd = model.state_dict()
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    expected |= {f"blocks.{i}.{m}.{t}" for i in range(12) for m in block for t in ("weight", "bias")}
    expected |= {f"decoder_blocks.{i}.{m}.{t}" for i in range(8) for m in block for t in ("weight", "bias")}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 197, 768) and sd["decoder_pos_embed"].shape == (1, 197, 512)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["decoder_pred.weight"].shape == (768, 512) and sd["mask_token"].shape == (1, 1, 512)
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder") and n != "mask_token") == 85_798_656
    assert ARCHS["mae_vit_huge_patch14"]["patch_size"] == 14 and ARCHS["mae_vit_large_patch16"]["depth"] == 24


@pytest.mark.parametrize("size", sorted({s.size for s in get_curriculum("etpp-deit").stages}))
def test_grid_follows_input_at_every_curriculum_size(size):
    model = create_mae("mae_vit_base_patch16", img_size=224, **TINY)
    imgs = torch.randn(2, 3, size, size)
    loss, pred, mask = model(imgs)
    g = size // 16
    assert pred.shape == (2, g * g, 16 * 16 * 3) and mask.shape == (2, g * g)
    assert int(mask[0].sum()) == g * g - int(g * g * 0.25)
    loss.backward()  # trains at every size
    assert model.patch_embed.proj.weight.grad is not None


def test_non_square_inputs_and_bad_sizes():
    model = create_mae("mae_vit_base_patch16", img_size=224, **TINY)
    _, pred, _ = model(torch.randn(1, 3, 96, 160))
    assert pred.shape == (1, 6 * 10, 768)
    with pytest.raises(ValueError, match="input size 100x100 is not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="unknown MAE target 'depth'; allowed: pixel, norm_pixel, hog"):
        create_mae("mae_vit_base_patch16", target="depth")
    with pytest.raises(ValueError, match="unknown MAE architecture"):
        create_mae("mae_vit_gigantic")


def test_scaled_pos_embed_keeps_image_locations():
    model = create_mae("mae_vit_base_patch16", img_size=224, **TINY)
    # final grid 14; a 112 input has grid 7: token (i, j) covers final patches 2i..2i+1, 2j..2j+1,
    # whose centre is at final-grid position 2i + 0.5. The embedding is sin-cos at that position.
    emb = model._pos_for("pos_embed", (7, 7))[0, 1:]
    d = 32
    for (i, j) in [(0, 0), (3, 5), (6, 6)]:
        row = torch.tensor([2 * i + 0.5])
        col = torch.tensor([2 * j + 0.5])
        omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
        expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
        torch.testing.assert_close(emb[i * 7 + j].double(), expect, atol=1e-6, rtol=0)
    # The final grid uses the stored (official) table itself.
    assert model._pos_for("pos_embed", (14, 14)) is model.pos_embed
    # Location semantics: the small-grid token nearest to a final-grid token has the most similar
    # embedding under 'scaled', and the image centre maps to the centre.
    centre_small = emb[3 * 7 + 3]
    sims = F.cosine_similarity(model.pos_embed[0, 1:], centre_small[None], dim=-1)
    r, c = divmod(int(sims.argmax()), 14)
    assert {r, c} <= {6, 7}


def test_regenerate_and_interpolate_modes():
    reg = create_mae("mae_vit_base_patch16", img_size=224, pos_embed_mode="regenerate", **TINY)
    np.testing.assert_allclose(reg._pos_for("pos_embed", (6, 6))[0].numpy(), official_sincos(32, 6), atol=1e-6)
    itp = create_mae("mae_vit_base_patch16", img_size=224, pos_embed_mode="interpolate", **TINY)
    from timm.layers import resample_abs_pos_embed

    torch.testing.assert_close(itp._pos_for("pos_embed", (6, 6)),
                               resample_abs_pos_embed(itp.pos_embed, [6, 6], [14, 14], num_prefix_tokens=1))
    with pytest.raises(ValueError, match="unknown pos_embed_mode 'learned'; allowed: scaled, regenerate, interpolate"):
        create_mae("mae_vit_base_patch16", pos_embed_mode="learned")


def test_pixel_targets():
    model = create_mae("mae_vit_base_patch16", img_size=32, patch_size=16, target="pixel", **TINY)
    imgs = torch.randn(2, 3, 32, 32)
    tgt = model.target_for(imgs)
    assert torch.equal(model.unpatchify(tgt, (2, 2)), imgs)           # round trip
    # patch 1 (row 0, col 1), element (row 2, col 5, channel 1) -> index (2*16 + 5)*3 + 1
    assert tgt[0, 1, (2 * 16 + 5) * 3 + 1] == imgs[0, 1, 2, 16 + 5]
    norm = create_mae("mae_vit_base_patch16", img_size=32, target="norm_pixel", **TINY).target_for(imgs)
    np.testing.assert_allclose(norm.mean(-1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(norm.var(-1).numpy(), 1, atol=1e-3)


# ---- HOG -------------------------------------------------------------------------------------
def hog_index(c, b, r, col, nbins=9, k=2):
    return ((c * nbins + b) * k + r) * k + col


@pytest.mark.parametrize("window", [False, True])
def test_hog_vertical_edge_by_hand(window):
    # 16 x 32 image, two 16-px patches; a vertical step between columns 7 and 8 in patch 0.
    img = torch.zeros(1, 3, 16, 32)
    img[..., 8:] = 1.0
    img[..., 16:] = 1.0  # patch 1 is flat (value 1)
    hog = HOGTarget(patch_size=16, gaussian_window=window)(img)
    assert hog.shape == (1, 2, 108)
    # Sobel: gx = (x[j-1] - x[j+1]) * 4 = -4 at columns 7 and 8, gy = 0 -> atan2(-4, 0) = -pi/2
    # -> -4.5 bins -> floor -5 -> mod 9 = bin 4. Every cell of patch 0 sees the edge.
    expect0 = torch.zeros(108)
    for c in range(3):
        for r in range(2):
            for col in range(2):
                expect0[hog_index(c, 4, r, col)] = 1.0
    torch.testing.assert_close(hog[0, 0], expect0)
    torch.testing.assert_close(hog[0, 1], torch.zeros(108))  # no gradient, no histogram


def test_hog_horizontal_edge_and_layout():
    img = torch.zeros(1, 3, 32, 16)
    img[:, :, 4:, :] = 1.0  # edge between rows 3 and 4: only the top cells of patch 0 see it
    img[:, 1] *= 0.0        # channel 1 flat
    hog = HOGTarget(patch_size=16, gaussian_window=False)(img)
    # gy = (x[i-1] - x[i+1]) * 4 = -4, gx = 0 -> atan2(0, -4) = pi -> 9 bins -> mod 9 = bin 0
    expect0 = torch.zeros(108)
    for c in (0, 2):
        for col in range(2):
            expect0[hog_index(c, 0, 0, col)] = 1.0
    torch.testing.assert_close(hog[0, 0], expect0)
    torch.testing.assert_close(hog[0, 1], torch.zeros(108))


def test_hog_target_model_and_errors():
    model = create_mae("mae_vit_base_patch16", img_size=64, target="hog", **TINY)
    loss, pred, _ = model(torch.randn(2, 3, 48, 48))
    assert pred.shape == (2, 9, 108) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="patch size 14 is not a multiple of the HOG cell size 8"):
        create_mae("mae_vit_huge_patch14", target="hog", **TINY)


def test_official_constructor_keywords_build_the_same_model():
    """Scripts written for the official models_mae pass norm_pix_loss= (and norm_layer=, mlp_ratio=)."""
    from functools import partial

    import torch.nn as nn

    from pretrain.models_mae import mae_vit_base_patch16, mae_vit_base_patch16_dec512d8b

    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2)
    on = mae_vit_base_patch16_dec512d8b(norm_pix_loss=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                        mlp_ratio=4, **small)
    off = mae_vit_base_patch16(norm_pix_loss=False, **small)
    assert (on.target, on.norm_pix_loss) == ("norm_pixel", True)
    assert (off.target, off.norm_pix_loss) == ("pixel", False)
    assert mae_vit_base_patch16(**small).target == "norm_pixel"                  # the toolkit's default
    assert mae_vit_base_patch16(target="pixel", norm_pix_loss=False, **small).target == "pixel"
    with pytest.raises(ValueError, match="norm_pix_loss=True means target 'norm_pixel', but target='hog'"):
        mae_vit_base_patch16(norm_pix_loss=True, target="hog", **small)
    imgs = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    loss_on = on(imgs, mask_ratio=0.75)[0]
    off.load_state_dict(on.state_dict())
    torch.manual_seed(0)
    loss_off = off(imgs, mask_ratio=0.75)[0]
    assert torch.isfinite(loss_on) and loss_on != loss_off                    # the two targets differ


@pytest.mark.parametrize("window", [True, False])
def test_hog_is_float32_under_autocast(window):
    """The training step runs under bf16 autocast on a GPU (here: the CPU's): the HOG target must
    be the float32 one, bit for bit (before: bf16 gradients, and without the Gaussian window the
    bf16 magnitude could not be scattered into the float32 histogram)."""
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hog = HOGTarget(patch_size=16, gaussian_window=window)
    ref = hog(img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hog(img)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
