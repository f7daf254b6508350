"""Plain ViT backbone for detection, ViTDet's model (detectron2 ``ViT``), loading MAE / fine-tuned
/ official weights.

One feature map at stride ``patch_size`` comes out; the simple feature pyramid
(:mod:`detection.sfp`) builds the multi-scale levels from it. Two sizes, named as in detectron2
and mmdet's ViTDet project:

- ``img_size``: the detection input, the fixed square every image is padded to
  (:class:`detection.preprocess.SquarePadDataPreprocessor`; 1024 in ViTDet). It sizes the
  relative-position tables of the global blocks (``2 * img_size / patch - 1`` entries: 127 at
  1024/16), so an entry is one token offset;
- ``pretrain_img_size``: the pretraining input (224 for MAE); the absolute position table keeps
  its grid (14x14 at 224/16) and is resampled bicubically to each input's grid, as ViTDet does.

Window blocks have relative-position tables of ``2 * window_size - 1`` entries. The blocks are
timm's ``VisionTransformerSAM`` blocks (a port of ViTDet's: window padding, decomposed relative
position bias); parameter names are those of MAE / timm (``patch_embed.proj``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``), so checkpoints map onto it with
few renames (:mod:`detection.checkpoint_io`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.model import BaseModule
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer_sam import Block
from torch.utils.checkpoint import checkpoint

from mmdet.registry import MODELS

from engine.config import ConfigError
from engine.pos_embed import resample_pos_embed

from .checkpoint_io import KeyReport, check_file, load_backbone_checkpoint

# ViTDet's global-attention blocks (the others use windows) per depth.
DEFAULT_GLOBAL_BLOCKS = {12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}
INIT_CFG_KEYS = ("type", "checkpoint", "prefix")


def check_init_cfg(init_cfg: Optional[dict]) -> None:
    """``None`` or ``dict(type='Pretrained', checkpoint=PATH[, prefix='backbone.'])``, else ConfigError."""
    if init_cfg is None:
        return
    ok = (isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained" and not set(init_cfg) - set(INIT_CFG_KEYS)
          and isinstance(init_cfg.get("checkpoint"), str) and init_cfg["checkpoint"]
          and isinstance(init_cfg.get("prefix", ""), str))
    if not ok:
        raise ConfigError(f"PlainViT init_cfg must be None or dict(type='Pretrained', checkpoint=PATH) with an "
                          f"optional prefix='backbone.' (the backbone of a whole detector's checkpoint), "
                          f"got {init_cfg!r}")


@MODELS.register_module()
class PlainViT(BaseModule):
    """ViTDet backbone: a plain (single-scale) ViT returning ``(feature map [B, D, H/p, W/p],)``.

    Args:
        img_size: detection input size (the padded square, ViTDet: 1024): sizes the global blocks'
            relative-position tables. Inputs of another size still run (the tables are resampled
            linearly, as detectron2 does; logged once per grid), but are not ViTDet's model.
        pretrain_img_size: pretraining input size: the absolute position table's grid, resampled
            (bicubic) to each input's grid.
        global_attn_indexes: blocks with global attention; ``None`` takes ViTDet's choice for
            depths 12/24/32 (every quarter), otherwise it must be given (detectron2 names the
            complement, ``window_block_indexes``).
        window_size: window side (tokens) of the other blocks; 0 makes every block global.
        use_rel_pos: add a decomposed relative position bias (zero-initialised; not in MAE
            checkpoints, so it is reported as an expected miss).
        with_cp: activation checkpointing of every block while training (saves memory, costs
            one extra forward; the same numbers).
        init_cfg: ``None`` (random init) or ``dict(type='Pretrained', checkpoint=PATH)`` for our MAE
            pretraining checkpoints, encoder exports, fine-tuned classifiers and official MAE
            files; ``prefix='backbone.'`` takes the backbone out of a whole detector's checkpoint.
    Inputs whose sides are not multiples of ``patch_size`` are zero-padded (bottom / right), so the
    map is ``ceil(H / p) x ceil(W / p)``; windows pad the token map as they need.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, pretrain_img_size: int = 224, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.1, window_size: int = 14,
                 global_attn_indexes: Optional[Sequence[int]] = None, use_abs_pos: bool = True,
                 use_rel_pos: bool = False, with_cp: bool = False, init_cfg: Optional[dict] = None) -> None:
        check_init_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)
        for key, size in (("img_size", img_size), ("pretrain_img_size", pretrain_img_size)):
            if not isinstance(size, int) or size <= 0 or size % patch_size:
                raise ConfigError(f"PlainViT {key} {size!r} is not a positive multiple of patch_size {patch_size} "
                                  "(img_size: the padded detection input, e.g. 1024; pretrain_img_size: the "
                                  "pretraining input, e.g. 224)")
        if window_size < 0:
            raise ConfigError(f"PlainViT window_size must be >= 0 (0: global attention everywhere), got {window_size}")
        if embed_dim % num_heads:
            raise ConfigError(f"PlainViT embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if global_attn_indexes is None:
            if depth not in DEFAULT_GLOBAL_BLOCKS:
                raise ConfigError(f"PlainViT: no default global_attn_indexes for depth {depth} (defaults exist for "
                                  f"{sorted(DEFAULT_GLOBAL_BLOCKS)}); pass them explicitly")
            global_attn_indexes = DEFAULT_GLOBAL_BLOCKS[depth]
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"PlainViT global_attn_indexes {list(global_attn_indexes)} has blocks {bad} "
                              f"outside 0..{depth - 1}")
        self.img_size, self.pretrain_img_size = img_size, pretrain_img_size
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.input_grid = (img_size // patch_size, img_size // patch_size)
        self.pretrain_grid = (pretrain_img_size // patch_size, pretrain_img_size // patch_size)
        self.global_attn_indexes = tuple(sorted(set(global_attn_indexes)))
        self.window_size, self.use_rel_pos, self.with_cp = window_size, use_rel_pos, with_cp
        self._reported_grids: Set[Tuple[int, int]] = set()

        self.patch_embed = PatchEmbed(pretrain_img_size, patch_size, in_chans, embed_dim, flatten=False,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        n = self.pretrain_grid[0] * self.pretrain_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim)) if use_abs_pos else None
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()   # (a "meta" model too)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_rel_pos=use_rel_pos,
                  window_size=0 if window_size == 0 or i in self.global_attn_indexes else window_size,
                  input_size=self.input_grid)
            for i in range(depth))
        self._init_random()

    def _init_random(self) -> None:
        """ViT defaults (MAE / ViTDet): truncated-normal linears and positions, zero relative bias."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, m in self.blocks.named_modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif getattr(m, "use_rel_pos", False):
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)

    def init_weights(self) -> None:
        """Random init, then the pretrained weights when ``init_cfg`` names a checkpoint."""
        self._init_random()
        if self.init_cfg is not None:
            load_backbone_checkpoint(self, self.init_cfg["checkpoint"], logger=MMLogger.get_current_instance(),
                                     prefix=self.init_cfg.get("prefix"))
        self._is_init = True

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Absolute position embeddings [1, gh, gw, D] for a ``grid`` patch map."""
        pos = self.pos_embed
        if tuple(grid) != self.pretrain_grid:
            pos = resample_pos_embed(pos, grid, self.pretrain_grid)
        return pos.reshape(1, grid[0], grid[1], -1)

    def _report_grid(self, grid: Tuple[int, int]) -> None:
        """Say once per grid that global blocks resample their tables (not ViTDet's fixed-size model)."""
        if grid in self._reported_grids or not self.use_rel_pos or len(self._reported_grids) > 16:
            return
        self._reported_grids.add(grid)
        print_log(f"PlainViT: a {grid[0]}x{grid[1]} token map, not img_size {self.img_size} / patch {self.patch_size} "
                  f"= {self.input_grid[0]}x{self.input_grid[1]}: the global blocks' relative-position tables are "
                  "resampled for it (as detectron2 does). ViTDet pads every image to img_size "
                  "(model.data_preprocessor: SquarePadDataPreprocessor)", logger="current", level=30)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"PlainViT expects images [B, C, H, W], got shape {tuple(x.shape)}")
        x = self.patch_embed(x)                                     # [B, h, w, D], padded to the patch
        grid = tuple(x.shape[1:3])
        if grid != self.input_grid:
            self._report_grid(grid)
        if self.pos_embed is not None:   # fp32 table: under autocast the residual stream stays fp32
            x = x + self.pos_embed_for(grid)
        for blk in self.blocks:
            if self.with_cp and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return (x.permute(0, 3, 1, 2).contiguous(),)


def check_backbone_checkpoint(backbone_cfg: Mapping[str, Any], path: str, what: str = "pretrained") -> KeyReport:
    """What :func:`load_backbone_checkpoint` would do with ``path`` for the backbone of a config
    (``model.backbone``: a ``PlainViT`` dict), without its cost: the backbone is built on the
    ``meta`` device and the file memory-mapped, so only shapes are compared. Raises
    :class:`CheckpointError` / :class:`CheckpointMismatchError` as loading would (entry points
    call it before the expensive steps of a run: building datasets, the optimizer)."""
    kwargs = {k: v for k, v in backbone_cfg.items() if k not in ("type", "_scope_", "init_cfg")}
    init_cfg = backbone_cfg.get("init_cfg") or {}
    with torch.device("meta"):
        model = PlainViT(**kwargs)
    return check_file(model, path, what, mmap=True, prefix=init_cfg.get("prefix"))[1]
