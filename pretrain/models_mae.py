"""Masked autoencoder ViT whose patch grid follows the input size (for curriculum stages).

State-dict names and shapes are the official MAE ones (facebookresearch/mae ``models_mae.py``), so
official checkpoints load into this model and ours into tools written for the official ones.
Position embeddings are stored for the final grid; smaller grids get embeddings that mean the
same image location (``pos_embed_mode='scaled'``, default), the plain integer-grid embedding
(``'regenerate'``) or a bicubic resampling of the final table (``'interpolate'``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block

from .hog import HOGTarget
from engine.pos_embed import POS_EMBED_MODES, sincos_pos_embed

TARGETS = ("pixel", "norm_pixel", "hog")


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 target: Optional[str] = None, pos_embed_mode: str = "scaled",
                 norm_pix_loss: Optional[bool] = None) -> None:
        """``target``: pixel | norm_pixel | hog (default norm_pixel). ``norm_pix_loss``: the official
        constructor's keyword, accepted so scripts written for facebookresearch/mae's
        ``models_mae`` build this model unchanged (True: norm_pixel, False: pixel)."""
        super().__init__()
        if norm_pix_loss is not None:
            implied = "norm_pixel" if norm_pix_loss else "pixel"
            if target is not None and target != implied:
                raise ValueError(f"norm_pix_loss={norm_pix_loss} means target {implied!r}, but target={target!r} "
                                 "was given too; pass one of them")
            target = implied
        target = target or "norm_pixel"
        if target not in TARGETS:
            raise ValueError(f"unknown MAE target {target!r}; allowed: {', '.join(TARGETS)}")
        if pos_embed_mode not in POS_EMBED_MODES:
            raise ValueError(f"unknown pos_embed_mode {pos_embed_mode!r}; allowed: {', '.join(POS_EMBED_MODES)}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.target, self.pos_embed_mode = target, pos_embed_mode
        self.final_grid = (img_size // patch_size, img_size // patch_size)

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.hog = HOGTarget(patch_size, in_chans=in_chans) if target == "hog" else None
        out_dim = self.hog.dim if self.hog is not None else patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, out_dim, bias=True)

        self._grid_pos: Dict[Tuple[str, Tuple[int, int]], torch.Tensor] = {}
        self.initialize_weights()

    # ---- initialisation (as the official code) ----------------------------------------------
    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.final_grid, self.final_grid))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.final_grid, self.final_grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set:
        """Tokens and position embeddings are not decayed (norms and biases are 1-D: not decayed)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def norm_pix_loss(self) -> bool:
        return self.target == "norm_pixel"

    def grid_for(self, imgs: torch.Tensor) -> Tuple[int, int]:
        H, W = imgs.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}; "
                             f"curriculum sizes must be multiples of {p} (set multiple_of={p})")
        return H // p, W // p

    def _make_pos(self, which: str, grid: Tuple[int, int]) -> torch.Tensor:
        table = getattr(self, which)
        if self.pos_embed_mode == "interpolate":
            return resample_abs_pos_embed(table.detach(), list(grid), list(self.final_grid), num_prefix_tokens=1)
        emb = sincos_pos_embed(table.shape[-1], grid, self.final_grid, self.pos_embed_mode)
        return emb.to(device=table.device, dtype=table.dtype)

    def prepare_input_size(self, size: int) -> None:
        """Build the encoder and decoder position tables for ``size x size`` inputs, once, outside
        ``forward`` (the training loop calls it at every stage start, after moving the model and
        loading a checkpoint); ``forward`` then only looks them up."""
        grid = (size // self.patch_size, size // self.patch_size)
        self._grid_pos = {}
        if grid != self.final_grid:
            for which in ("pos_embed", "decoder_pos_embed"):
                self._grid_pos[(which, grid)] = self._make_pos(which, grid)

    def _pos_for(self, which: str, grid: Tuple[int, int]) -> torch.Tensor:
        """Position table [1, 1 + gh*gw, D] for ``grid``: the stored one at the final grid, the one
        :meth:`prepare_input_size` built, or (for a size nobody prepared, e.g. a picture) a fresh one."""
        if grid == self.final_grid:
            return getattr(self, which)
        table = self._grid_pos.get((which, grid))
        return table if table is not None else self._make_pos(which, grid)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (row in patch, column in patch, channel), as the official code."""
        N, C = imgs.shape[:2]
        gh, gw = self.grid_for(imgs)
        p = self.patch_size
        x = imgs.reshape(N, C, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, gh * gw, p * p * C)

    def unpatchify(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]; ``grid`` defaults to a square grid."""
        N, L = x.shape[:2]
        gh, gw = grid or (int(round(L ** 0.5)),) * 2
        p, C = self.patch_size, self.in_chans
        x = x.reshape(N, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, gh * p, gw * p)

    # ---- MAE -----------------------------------------------------------------------------------
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """Per-sample shuffle by ``noise`` (uniform if None); keep the first (1 - ratio) * L."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif noise.shape != (N, L):
            raise ValueError(f"noise must have shape (N, L) = {(N, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        grid = self.grid_for(imgs)
        pos = self._pos_for("pos_embed", grid)
        x = self.patch_embed(imgs) + pos[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Encoder features of whole (unmasked) images [N, D]: the normed cls token (``cls``, what
        MAE's linear probe uses) or the mean of the normed patch tokens (``avgpool``). Draws no
        random numbers (no masking), so evaluating never changes a training run."""
        if pool not in ("cls", "avgpool"):
            raise ValueError(f"pool must be 'cls' or 'avgpool', got {pool!r}")
        pos = self._pos_for("pos_embed", self.grid_for(imgs))
        x = self.patch_embed(imgs) + pos[:, 1:, :]
        cls = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(x)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self._pos_for("decoder_pos_embed", grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def target_for(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch regression target [N, L, out_dim] for the (normalised, stage-size) images."""
        if self.hog is not None:
            return self.hog(imgs)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only."""
        target = self.target_for(imgs)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, self.grid_for(imgs))
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


ARCHS: Dict[str, dict] = {
    # name: encoder (patch, dim, depth, heads) + decoder (dim, depth, heads)
    "mae_vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "mae_vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def create_mae(arch: str, **overrides) -> MaskedAutoencoderViT:
    """Build a named architecture (``ARCHS``); keyword overrides (img_size, patch_size, target,
    pos_embed_mode, depth, ...) replace its defaults."""
    if arch not in ARCHS:
        raise ValueError(f"unknown MAE architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    return MaskedAutoencoderViT(**{**ARCHS[arch], **overrides})


def _factory(name: str) -> Callable[..., MaskedAutoencoderViT]:
    def make(**overrides) -> MaskedAutoencoderViT:
        return create_mae(name, **overrides)
    make.__name__ = name
    make.__doc__ = f"MAE {name} ({ARCHS[name]})."
    return make


mae_vit_tiny_patch16 = _factory("mae_vit_tiny_patch16")
mae_vit_small_patch16 = _factory("mae_vit_small_patch16")
mae_vit_base_patch16 = _factory("mae_vit_base_patch16")
mae_vit_large_patch16 = _factory("mae_vit_large_patch16")
mae_vit_huge_patch14 = _factory("mae_vit_huge_patch14")
# The official factory names (decoder 512-d, 8 blocks) as aliases.
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14
