"""Plain ViT backbone for detection (ViTDet-style), loading MAE / fine-tuned / official weights.

One feature map at stride ``patch_size`` comes out; the simple feature pyramid
(:mod:`detection.sfp`) builds the multi-scale levels from it. Most blocks attend within
non-overlapping windows and a few attend globally (ViTDet), absolute position embeddings are
resampled to every input's patch grid, and an optional decomposed relative position bias is
added to the attention logits. Parameter names are those of MAE / timm (``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``), so checkpoints map
onto it with few renames (:mod:`detection.checkpoint_io`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from mmdet.registry import MODELS

from engine.config import ConfigError
from pretrain.pos_embed import resample_pos_embed

from .checkpoint_io import load_backbone_checkpoint

# ViTDet's global-attention blocks (the others use windows) per depth.
DEFAULT_GLOBAL_BLOCKS = {12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """[B, H, W, C] -> [B * nW, window, window, C], zero-padding H and W up to multiples of
    ``window`` (bottom / right); also returns the padded size for :func:`window_unpartition`."""
    B, H, W, C = x.shape
    ph, pw = (-H) % window, (-W) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: Tuple[int, int],
                       size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away: -> [B, H, W, C]."""
    Hp, Wp = padded
    C = windows.shape[-1]
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return x[:, :size[0], :size[1]]


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """[2L-1, C] relative-offset embeddings -> [size, size, C] indexed by (query, key) offset.

    The table is resampled linearly along the offset axis when it was made for another length
    (global blocks at an input size other than the pretraining grid)."""
    n = 2 * size - 1
    if table.shape[0] != n:
        table = F.interpolate(table.t().unsqueeze(0), size=n, mode="linear", align_corners=False)[0].t()
    idx = torch.arange(size, device=table.device)
    return table[idx[:, None] - idx[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] token map (torch SDPA), with an optional
    decomposed relative position bias (ViTDet / MViTv2: separate row and column tables)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rel_pos_size: Optional[int] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"PlainViT embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if self.use_rel_pos:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def _rel_bias(self, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """[B, heads, HW, C] queries -> additive logits bias [B, heads, HW, HW]."""
        B, h, _, C = q.shape
        r = q.reshape(B, h, H, W, C)
        rh = torch.einsum("bnhwc,hkc->bnhwk", r, relative_table(self.rel_pos_h, H).to(q.dtype))
        rw = torch.einsum("bnhwc,wkc->bnhwk", r, relative_table(self.rel_pos_w, W).to(q.dtype))
        return (rh[..., :, None] + rw[..., None, :]).reshape(B, h, H * W, H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._rel_bias(q, H, W) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class Block(nn.Module):
    """Pre-norm transformer block on a [B, H, W, C] map; ``window > 0`` attends within windows."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 window: int, rel_pos_size: Optional[int]) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        y = self.norm1(x)
        if self.window:
            y, padded = window_partition(y, self.window)
            y = window_unpartition(self.attn(y), self.window, padded, (H, W))
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


@MODELS.register_module()
class PlainViT(BaseModule):
    """ViTDet backbone: a plain (single-scale) ViT returning ``(feature map [B, D, H/p, W/p],)``.

    Args:
        img_size: pretraining input size; the stored position table covers its patch grid and is
            resampled (bicubic) to each input's grid.
        global_attn_indexes: blocks with global attention; ``None`` takes ViTDet's choice for
            depths 12/24/32 (every quarter), otherwise it must be given.
        window_size: window side (tokens) of the other blocks; 0 makes every block global.
        use_rel_pos: add a decomposed relative position bias (zero-initialised; not in MAE
            checkpoints, so it is reported as an expected miss).
        with_cp: activation checkpointing of every block while training (saves memory, costs
            one extra forward).
        init_cfg: ``None`` (random init) or ``dict(type='Pretrained', checkpoint=PATH)`` for our MAE
            pretraining checkpoints, encoder exports, fine-tuned classifiers and official MAE files.
    Inputs whose sides are not multiples of ``patch_size`` are zero-padded (bottom / right), so the
    map is ``ceil(H / p) x ceil(W / p)``; windows pad the token map as they need.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.1, window_size: int = 14,
                 global_attn_indexes: Optional[Sequence[int]] = None, use_abs_pos: bool = True,
                 use_rel_pos: bool = False, with_cp: bool = False, init_cfg: Optional[dict] = None) -> None:
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained"
                                     or set(init_cfg) - {"type", "checkpoint"} or not init_cfg.get("checkpoint")):
            raise ConfigError(f"PlainViT init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                              f"got {init_cfg!r}")
        super().__init__(init_cfg=init_cfg)
        if img_size % patch_size:
            raise ConfigError(f"PlainViT img_size {img_size} is not a multiple of patch_size {patch_size}")
        if window_size < 0:
            raise ConfigError(f"PlainViT window_size must be >= 0 (0: global attention everywhere), got {window_size}")
        if global_attn_indexes is None:
            if depth not in DEFAULT_GLOBAL_BLOCKS:
                raise ConfigError(f"PlainViT: no default global_attn_indexes for depth {depth} (defaults exist for "
                                  f"{sorted(DEFAULT_GLOBAL_BLOCKS)}); pass them explicitly")
            global_attn_indexes = DEFAULT_GLOBAL_BLOCKS[depth]
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"PlainViT global_attn_indexes {list(global_attn_indexes)} has blocks {bad} "
                              f"outside 0..{depth - 1}")
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.pretrain_grid = (img_size // patch_size, img_size // patch_size)
        self.global_attn_indexes = tuple(sorted(set(global_attn_indexes)))
        self.window_size, self.with_cp = window_size, with_cp

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        n = self.pretrain_grid[0] * self.pretrain_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim)) if use_abs_pos else None
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()   # (a "meta" model too)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            is_global = window_size == 0 or i in self.global_attn_indexes
            window = 0 if is_global else window_size
            rel = (self.pretrain_grid[0] if is_global else window_size) if use_rel_pos else None
            self.blocks.append(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], window, rel))
        self._init_random()

    def _init_random(self) -> None:
        """ViT defaults (MAE / ViTDet): truncated-normal linears and positions, zero relative bias."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention) and m.use_rel_pos:
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)

    def init_weights(self) -> None:
        """Random init, then the pretrained weights when ``init_cfg`` names a checkpoint."""
        self._init_random()
        if self.init_cfg is not None:
            load_backbone_checkpoint(self, self.init_cfg["checkpoint"], logger=MMLogger.get_current_instance())
        self._is_init = True

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Absolute position embeddings [1, gh, gw, D] for a ``grid`` patch map."""
        pos = self.pos_embed
        if tuple(grid) != self.pretrain_grid:
            pos = resample_pos_embed(pos, grid, self.pretrain_grid)
        return pos.reshape(1, grid[0], grid[1], -1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"PlainViT expects images [B, C, H, W], got shape {tuple(x.shape)}")
        x = self.patch_embed(x)                                     # [B, h, w, D], padded to the patch
        if self.pos_embed is not None:   # fp32 table: under autocast the residual stream stays fp32
            x = x + self.pos_embed_for(x.shape[1:3])
        for blk in self.blocks:
            if self.with_cp and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return (x.permute(0, 3, 1, 2).contiguous(),)
