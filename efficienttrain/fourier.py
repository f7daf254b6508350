"""Frequency-domain operations of EfficientTrain: the low-frequency crop and its baselines.

All functions act on the last two dimensions of a batched tensor ``[..., H, W]`` (any leading
dims: batch, channels, ...), on CPU or CUDA, without Python loops over the batch.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Size = Union[int, Sequence[int]]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DOWNSAMPLE_MODES = ("bilinear", "bicubic", "area", "nearest")


def _check_input(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{fn}: input dtype {x.dtype} is not supported; allowed: float16, bfloat16, float32, "
            "float64 (convert uint8 images to float and normalize them first)")
    if x.dim() < 2:
        raise ValueError(f"{fn}: input must have shape [..., H, W], got shape {tuple(x.shape)}")


def _parse_size(size: Size, x: torch.Tensor, fn: str) -> Tuple[int, int]:
    if isinstance(size, bool):
        raise ValueError(f"{fn}: size must be an int or a pair (h, w), got {size!r}")
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: size must be an int or a pair (h, w), got {size!r}") from None
    H, W = x.shape[-2:]
    if not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(
            f"{fn}: output size ({h}, {w}) is not allowed for an input of spatial size ({H}, {W}); "
            f"each side must be between 1 and the input side (h in [1, {H}], w in [1, {W}])")
    return h, w


def _centred_indices(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    """DFT indices (in unshifted order) of the centred block of length n_out of an n_in spectrum.

    After fftshift the block covers shifted rows ``n_in//2 - n_out//2 ... + n_out``, i.e. the
    frequencies ``-(n_out//2) ... n_out - n_out//2 - 1``. Listed in the small spectrum's own
    unshifted order (frequency f at position f mod n_out), so ifftshift is implicit.
    """
    pos = torch.arange(n_out - n_out // 2, device=device)             # 0 .. n_out-n_out//2-1
    neg = torch.arange(n_in - n_out // 2, n_in, device=device)        # -(n_out//2) .. -1
    return torch.cat([pos, neg])


def low_frequency_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Keep the centred ``h x w`` block of each 2-D slice's spectrum and return it as an image.

    For every slice X (H x W): ``real(ifft2(ifftshift(C(fftshift(fft2(X)))))) * (h*w)/(H*W)``,
    where C keeps shifted rows ``H//2 - h//2 .. +h`` (columns likewise). A constant image stays the
    same constant and ``size == (H, W)`` returns ``x`` itself. Computed in float32 (float64 stays
    float64), returned in the input dtype.

    Implementation: one real-input ``rfft2`` of the input and one ``irfft2`` of the h x w block,
    which is exactly the definition above. Taking the real part of the inverse equals inverting
    the block's Hermitian part; that differs from the raw block only on the unpaired Nyquist
    row/column of even output sizes, where the Hermitian part is the mean of the two aliasing
    frequencies (+-h/2) and, at the corner, the real part. We build those entries explicitly, so
    the half-spectrum handed to ``irfft2`` is valid and no full complex spectrum is ever formed.
    """
    _check_input(x, "low_frequency_crop")
    h, w = _parse_size(size, x, "low_frequency_crop")
    H, W = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    spec = torch.fft.rfft2(x.to(compute_dtype), dim=(-2, -1))         # [..., H, W//2+1]
    rows = _centred_indices(h, H, x.device)                              # block rows in DFT order
    half = spec[..., : w // 2 + 1].index_select(-2, rows)                # [..., h, w//2+1]
    if w % 2 == 0:  # Nyquist column: mean of frequencies -w/2 and +w/2 (X[a,-w/2] = conj X[-a,w/2])
        neg_rows = (-rows) % H
        half[..., w // 2] = 0.5 * (spec[..., rows, w // 2] + spec[..., neg_rows, w // 2].conj())
    if h % 2 == 0:  # Nyquist row: mean of frequencies -h/2 and +h/2
        half[..., h // 2, :] = 0.5 * (spec[..., H - h // 2, : w // 2 + 1] + spec[..., h // 2, : w // 2 + 1])
        if w % 2 == 0:  # corner: real part of X[-h/2, -w/2] = conj X[h/2, w/2]
            half[..., h // 2, w // 2] = spec[..., h // 2, w // 2].real
    out = torch.fft.irfft2(half, s=(h, w), dim=(-2, -1))
    out = out * ((h * w) / (H * W))
    return out.to(x.dtype)


def _radial_frequency(H: int, W: int, device: torch.device) -> torch.Tensor:
    """Distance of each (unshifted) DFT bin from the zero frequency, in frequency-index units."""
    fy = torch.fft.fftfreq(H, d=1.0 / H, device=device)
    fx = torch.fft.fftfreq(W, d=1.0 / W, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def _radial_filter(x: torch.Tensor, radius: float, keep_low: bool, fn: str) -> torch.Tensor:
    _check_input(x, fn)
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"{fn}: radius must be a number >= 0 (in frequency bins), got {radius!r}")
    H, W = x.shape[-2:]
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    spec = torch.fft.fft2(x.to(compute_dtype), dim=(-2, -1))
    dist = _radial_frequency(H, W, x.device)
    mask = (dist <= radius) if keep_low else (dist > radius)
    out = torch.fft.ifft2(spec * mask.to(spec.real.dtype), dim=(-2, -1)).real
    return out.to(x.dtype)


def low_pass_filter(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Circular low-pass filter (EfficientTrain Figure 2): keep DFT bins within ``radius`` of the
    centre of the shifted spectrum, zero the rest, same spatial size out."""
    return _radial_filter(x, radius, keep_low=True, fn="low_pass_filter")


def high_pass_filter(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Complement of :func:`low_pass_filter`: keep only bins farther than ``radius`` from the
    centre (used by the frequency-analysis experiments, Table 1)."""
    return _radial_filter(x, radius, keep_low=False, fn="high_pass_filter")


def downsample(x: torch.Tensor, size: Size, mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Image down-sampling, the baseline EfficientTrain compares the crop with (Table 13(b)).

    ``bilinear``/``bicubic`` are antialiased unless ``antialias=False`` (torch's ``F.interpolate``
    default, what AutoProg's official code shrinks inputs with); ``area`` averages by construction;
    ``nearest`` is plain subsampling. Computed in float32, returned in input dtype.
    """
    _check_input(x, "downsample")
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample: mode {mode!r} is not supported; allowed: {', '.join(DOWNSAMPLE_MODES)}")
    h, w = _parse_size(size, x, "downsample")
    H, W = x.shape[-2:]
    flat = x.reshape(-1, 1, H, W).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    kwargs = {"antialias": bool(antialias), "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=(h, w), mode=mode, **kwargs)
    return out.reshape(*x.shape[:-2], h, w).to(x.dtype)
