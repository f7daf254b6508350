"""Batched crop + resize + flip on any device, computing what PIL computes.

``Image.resize(size, BICUBIC, box=...)`` (the CPU data path's RandomResizedCrop) is a separable
filter: one pass along one axis over the region the other pass needs, rounded to uint8, then the
other pass, rounded again. Pillow >= 13 runs the vertical pass first when the height shrinks by
more than twice as many pixels as the width (Pillow PR 9549), older releases always start
horizontally; :func:`vertical_first` follows the installed Pillow. Each pass is a matrix product with a banded weight matrix whose
taps are PIL's (Resample.c: bicubic a = -0.5, support scaled by the down-scaling factor, so
shrinking is antialiased; weights normalised per output pixel, then rounded to 22-bit fixed
point). Here every image of a batch gets its two weight matrices, the images are cut to the
input region their crop box touches and zero-padded to one shape, and both passes run as one
batched matmul each, so a batch of differently sized images is cropped and resized in a few
device kernels.

Exactness: in float64 the products and sums of the fixed-point weights and 8-bit pixels are
exact, so the result equals PIL's byte for byte (tested); float32 (the CPU default) differs by
one level on about one pixel in 100,000. float16 (the default on CUDA, where float64 matmuls are
slow) rounds the weights to 11 bits: at most 2 levels, on a few percent of pixels, mean below
0.15 levels (tested on the CPU in float16).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import PIL
import torch

PRECISION_BITS = 22          # PIL's fixed-point precision for 8-bit images (32 - 8 - 2)
_BICUBIC_SUPPORT = 2.0
_PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether the installed Pillow resizes an ``in_h x in_w`` image to ``out_h x out_w`` starting
    with the vertical pass (the order changes the intermediate rounding)."""
    return _PIL_VERTICAL_FIRST and in_h > out_h and in_h - out_h > 2 * (in_w - out_w)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), elementwise, evaluated in the same operation order."""
    a = -0.5
    x = x.abs()
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without waiting for queued device work (pinned, non-blocking);
    a plain copy from pageable memory would synchronise the stream."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _centers(in_len: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, xx: torch.Tensor, out_len: int):
    """PIL's geometry (float64) for output indices ``xx``: centres, filter scale, first and end input index."""
    start64, stop64 = start.double(), stop.double()
    scale = (stop64 - start64) / out_len
    filterscale = scale.clamp(min=1.0)
    support = _BICUBIC_SUPPORT * filterscale
    center = start64[:, None] + (xx[None, :] + 0.5) * scale[:, None]
    xmin = torch.trunc(center - support[:, None] + 0.5).clamp(min=0)        # C's (int) cast, then >= 0
    xmax = torch.minimum(torch.trunc(center + support[:, None] + 0.5), in_len.double()[:, None])
    return center, filterscale, xmin, xmax


def axis_bounds(in_len: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, out_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image (int64 [N] each), the first input index a resize along one axis reads and how
    many it reads (PIL's ``ybox_first`` / ``ybox_last``): computed on the host, so the batch's
    geometry never has to be read back from the device."""
    ends = torch.tensor([0.0, out_len - 1.0], dtype=torch.float64)
    _, _, xmin, xmax = _centers(in_len, start, stop, ends, out_len)
    return xmin[:, 0].long(), (xmax[:, 1] - xmin[:, 0]).long()


def axis_weights(in_len: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, out_len: int,
                 first: torch.Tensor, width: int, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PIL's resampling weights along one axis for a batch of crops, on the tensors' device.

    Args: per image the input length along the axis, the crop box's ``start`` and ``stop``, and
    the first input index of its region (:func:`axis_bounds`); the output length; ``width``, the
    region length to cover (the largest count in the batch); optionally a bool [N] that reverses
    the output order (a horizontal flip after the resize). Returns float64 [N, out_len, width]
    over input indices ``first .. first + width`` (zero beyond an image's own region), rounded to
    PIL's fixed point and divided by 2**22.
    """
    dev = in_len.device
    xx = torch.arange(out_len, device=dev, dtype=torch.float64)
    center, filterscale, xmin, xmax = _centers(in_len, start, stop, xx, out_len)
    x_abs = first.double()[:, None, None] + torch.arange(width, device=dev, dtype=torch.float64)[None, None, :]
    valid = (x_abs >= xmin[..., None]) & (x_abs < xmax[..., None])          # [N, S, R]
    ss = 1.0 / filterscale                                                  # PIL multiplies by the reciprocal
    w = _bicubic((x_abs - center[..., None] + 0.5) * ss[:, None, None]) * valid
    ww = w.sum(-1, keepdim=True)
    w = torch.where(ww != 0, w / torch.where(ww != 0, ww, torch.ones_like(ww)), w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = torch.trunc(torch.where(w < 0, scaled - 0.5, scaled + 0.5))     # normalize_coeffs_8bpc
    w = fixed / float(1 << PRECISION_BITS)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def _round_clip(x: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 after the fixed-point sum (+0.5 and floor, clamped to 0..255)."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                  flips: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                  max_pixels: int = 1 << 26) -> torch.Tensor:
    """Crop every image to its box, resize it to ``size x size`` (PIL bicubic) and flip it.

    Args:
        images: uint8 [3, H_i, W_i] tensors on one device (sizes may differ).
        boxes: int [N, 4] boxes ``(top, left, height, width)`` in pixels.
        flips: optional bool [N]: mirror the output horizontally.
        dtype: matmul dtype; default float32 on the CPU (PIL's bytes but for one level on about
            one pixel in 100,000; float64 is exact) and float16 elsewhere (tensor cores).
        max_pixels: bound on padded pixels per matmul group (images are grouped by region
            size, so one huge image does not pad the whole batch).
    Returns uint8 [N, 3, size, size] on the images' device. Nothing is read back from the
    device: the geometry is computed on the host from the image shapes and the boxes.
    """
    n = len(images)
    if n == 0:
        raise ValueError("resized_crops: no images")
    device = images[0].device
    if boxes.shape != (n, 4):
        raise ValueError(f"resized_crops: boxes must have shape ({n}, 4), got {tuple(boxes.shape)}")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    # geometry on the host (image shapes are host values; boxes and flips come from the loader)
    boxes = boxes.to("cpu", torch.int64)
    flips = torch.zeros(n, dtype=torch.bool) if flips is None else flips.to("cpu", torch.bool)
    heights = torch.tensor([im.shape[-2] for im in images], dtype=torch.int64)
    widths = torch.tensor([im.shape[-1] for im in images], dtype=torch.int64)
    top, left, h, w = boxes.unbind(1)
    y0, ny = axis_bounds(heights, top, top + h, size)
    x0, nx = axis_bounds(widths, left, left + w, size)
    geo = torch.stack([y0, ny, x0, nx], 1).tolist()
    meta = to_device(torch.stack([heights, widths, top, left, h, w, y0, x0, flips.long()], 1), device)   # [N, 9]
    vfirst = [vertical_first(im.shape[-2], im.shape[-1], size, size) for im in images]

    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    order = sorted(range(n), key=lambda i: (vfirst[i], geo[i][1] * geo[i][3]))
    group: List[int] = []
    for k, i in enumerate(order):
        group.append(i)
        nxt = order[k + 1] if k + 1 < n else None
        if (nxt is None or vfirst[nxt] != vfirst[i]
                or (len(group) + 1) * geo[nxt][1] * geo[nxt][3] > max_pixels):
            _resize_group(images, group, geo, meta, out, dtype, vfirst[i])
            group = []
    return out


def _resize_group(images: Sequence[torch.Tensor], idx: List[int], geo: List[List[int]], meta: torch.Tensor,
                  out: torch.Tensor, dtype: torch.dtype, vertical: bool) -> None:
    """Both passes for the images ``idx`` (regions padded to the group's largest, weights built for
    this group only, so one huge image costs memory in its own group), vertical pass first if
    ``vertical``."""
    size = out.shape[-1]
    rh = max(geo[i][1] for i in idx)
    rw = max(geo[i][3] for i in idx)
    region = torch.zeros(len(idx), 3, rh, rw, dtype=dtype, device=out.device)
    for j, i in enumerate(idx):
        y0, ny, x0, nx = geo[i]
        region[j, :, :ny, :nx] = images[i][:, y0:y0 + ny, x0:x0 + nx]
    sel = to_device(torch.tensor(idx), out.device)
    H, W, T, L, Hb, Wb, Y0, X0, F = meta[sel].unbind(1)
    ky = axis_weights(H, T, T + Hb, size, Y0, rh)[:, None].to(dtype)                           # [G, 1, S, rh]
    kx = axis_weights(W, L, L + Wb, size, X0, rw, F.bool())[:, None].to(dtype).transpose(-1, -2)  # [G, 1, rw, S]
    if vertical:
        res = _round_clip(torch.matmul(_round_clip(torch.matmul(ky, region)), kx))
    else:
        res = _round_clip(torch.matmul(ky, _round_clip(torch.matmul(region, kx))))
    out[sel] = res.to(torch.uint8)
