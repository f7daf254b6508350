"""HOG regression target (MaskFeat-style), computed on the device for any input size.

Per RGB channel: Sobel gradients (reflect padding), unsigned orientation in ``nbins`` bins over
pi, magnitude-weighted histograms summed over ``cell x cell`` pixel cells, L2-normalised over the
bins of each cell and channel. Optionally the magnitudes are weighted by a Gaussian window
centred in every patch (as mmpretrain's MaskFeat). Each patch's target concatenates its cells:
``(patch/cell)^2 * nbins * 3`` values (108 for patch 16), ordered channel, bin, cell row, cell col.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HOGTarget(nn.Module):
    def __init__(self, patch_size: int, nbins: int = 9, cell: int = 8, in_chans: int = 3,
                 gaussian_window: bool = True) -> None:
        super().__init__()
        if patch_size % cell:
            raise ValueError(
                f"HOG target: patch size {patch_size} is not a multiple of the HOG cell size {cell}; "
                f"use a patch size divisible by {cell} (e.g. 8 or 16) or the pixel targets")
        self.patch_size, self.nbins, self.cell, self.in_chans = patch_size, nbins, cell, in_chans
        sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight_x", sobel_x.view(1, 1, 3, 3).repeat(in_chans, 1, 1, 1), persistent=False)
        self.register_buffer("weight_y", sobel_x.t().contiguous().view(1, 1, 3, 3).repeat(in_chans, 1, 1, 1), persistent=False)
        if gaussian_window:
            n = torch.arange(patch_size, dtype=torch.float32) - (patch_size - 1) / 2.0
            g = torch.exp(-0.5 * (n / (patch_size / 2.0)) ** 2)
            window = torch.outer(g, g)
            self.register_buffer("window", window / window.sum(), persistent=False)
        else:
            self.window = None

    @property
    def dim(self) -> int:
        """Target values per patch."""
        return (self.patch_size // self.cell) ** 2 * self.nbins * self.in_chans

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (normalised images) -> [N, (H/p)*(W/p), dim] per-patch targets, in float32
        whatever autocast is active (the training step runs under bf16 / fp16 autocast on a GPU: the
        gradients and orientation bins of a target must not be rounded, and a half-precision
        magnitude cannot be scattered into the float32 histogram)."""
        with torch.autocast(imgs.device.type, enabled=False):
            return self._hog(imgs)

    def _hog(self, imgs: torch.Tensor) -> torch.Tensor:
        N, C, H, W = imgs.shape
        p, c = self.patch_size, self.cell
        if C != self.in_chans or H % p or W % p:
            raise ValueError(f"HOG target: expected [N, {self.in_chans}, H, W] with H, W multiples of {p}, got {tuple(imgs.shape)}")
        x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.weight_x, groups=C)
        gy = F.conv2d(x, self.weight_y, groups=C)
        mag = torch.sqrt(gx * gx + gy * gy)
        if self.window is not None:
            mag = mag * self.window.repeat(H // p, W // p)
        phase = torch.atan2(gx, gy) / torch.pi * self.nbins         # [-nbins, nbins]
        bins = torch.floor(phase).long() % self.nbins               # unsigned orientation
        hist = torch.zeros(N, C, self.nbins, H, W, device=imgs.device, dtype=torch.float32)
        hist.scatter_add_(2, bins.unsqueeze(2), mag.unsqueeze(2))
        hist = hist.view(N, C, self.nbins, H // c, c, W // c, c).sum(dim=(4, 6))   # [N, C, bins, Hc, Wc]
        hist = F.normalize(hist, p=2, dim=2)
        k = p // c                                                   # cells per patch side
        hist = hist.view(N, C, self.nbins, H // p, k, W // p, k)
        hist = hist.permute(0, 3, 5, 1, 2, 4, 6)                     # N, gh, gw, C, bins, k, k
        return hist.reshape(N, (H // p) * (W // p), self.dim)
