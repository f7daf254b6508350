"""2-D sin-cos position embeddings (MAE layout) for any patch grid.

Layout, as the official MAE ``get_2d_sincos_pos_embed``: tokens in row-major order; the first half
of the channels encodes the column (x) position, the second half the row (y) position; each half
is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 1 / 10000^(k / (D/4))``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from timm.layers import resample_abs_pos_embed

POS_EMBED_MODES = ("scaled", "regenerate", "interpolate")


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] embedding (sines then cosines)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Embedding of the grid ``rows x cols`` (1-D position tensors) -> [len(rows)*len(cols), dim]."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    yy, xx = torch.meshgrid(rows.to(torch.float64), cols.to(torch.float64), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xx), sincos_1d(dim // 2, yy)], dim=1).float()


def grid_positions(grid: int, final_grid: int, mode: str) -> torch.Tensor:
    """Positions at which a ``grid``-long axis is evaluated, in units of the final grid.

    ``scaled``: patch centres of the small grid mapped onto the final grid, so every token keeps
    the embedding of the image location it covers at every stage (``(i + 0.5) * G / g - 0.5``).
    ``regenerate``: the plain integer grid ``0..g-1`` (embeddings follow token index, not location).
    """
    i = torch.arange(grid, dtype=torch.float64)
    if mode == "scaled":
        return (i + 0.5) * (final_grid / grid) - 0.5
    if mode == "regenerate":
        return i
    raise ValueError(f"positions are only defined for modes 'scaled' and 'regenerate', got {mode!r}")


def sincos_pos_embed(dim: int, grid: Tuple[int, int], final_grid: Tuple[int, int], mode: str = "scaled",
                     cls_token: bool = True) -> torch.Tensor:
    """[1, (cls) + gh*gw, dim] sin-cos table for ``grid`` given the model's ``final_grid``."""
    rows = grid_positions(grid[0], final_grid[0], mode)
    cols = grid_positions(grid[1], final_grid[1], mode)
    emb = sincos_2d(dim, rows, cols)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


def resample_pos_embed(pos: torch.Tensor, new_grid: Sequence[int], old_grid: Optional[Sequence[int]] = None,
                       num_prefix_tokens: int = 0) -> torch.Tensor:
    """[1, prefix + old_h*old_w, D] -> [1, prefix + new_h*new_w, D] as MAE's ``interpolate_pos_embed``
    and ViTDet's ``get_abs_pos`` do when a pretrained table meets another grid: bicubic,
    ``align_corners=False``, no antialiasing (torch's antialiased bicubic uses another kernel,
    a=-0.5, even when upsampling). ``old_grid=None``: a square grid. Fine-tuning and detection
    transfer both use it."""
    return resample_abs_pos_embed(pos, list(new_grid), list(old_grid) if old_grid else None,
                                  num_prefix_tokens=num_prefix_tokens, antialias=False)
