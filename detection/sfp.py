"""Simple feature pyramid (ViTDet): every pyramid level from the backbone's single map.

A level at stride ``s`` from a backbone map at stride ``b`` is made by ``log2(b / s)`` stride-2
deconvolutions (LayerNorm + GELU between them) when ``s < b``, taken as is when ``s == b``, or
max-pooled by ``s / b`` when ``s > b``; then a 1x1 and a 3x3 convolution, each followed by a
LayerNorm over channels. The scale factors follow from the strides, so a patch-16 ViT-B (``b=16``)
and the patch-4 demo ViT (``b=4``) give the same strides 4-32 with the same config keys.
Extra coarser levels (RetinaNet's P6/P7, the RPN's stride 64) come from the last level by
stride-2 max-pooling (``'maxpool'``, as ViTDet / FPN's P6) or stride-2 3x3 convolutions
(``'conv'``, as RetinaNet's P6/P7).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d

from mmdet.registry import MODELS

from engine.config import ConfigError

EXTRA_TYPES = ("maxpool", "conv")
# LayerNorm over the channels of an NCHW map, for mmcv's ConvModule(norm_cfg=dict(type='LN2d', eps=1e-6))
# in ViTDet's heads (4conv1fc box head, mask head). mmdet 3.3's own 'LN' is torch's nn.LayerNorm,
# which normalises an NCHW map over its last axis (the width), not over the channels.
MODELS.register_module("LN2d", module=LayerNorm2d)


def _log2_ratio(stride: int, backbone_stride: int) -> int:
    """Signed number of 2x steps from the backbone stride to ``stride``; errors unless a power of 2."""
    k = math.log2(stride / backbone_stride) if stride > 0 else 0.5   # 0.5: not a whole number of steps
    if k != round(k):
        raise ConfigError(f"SimpleFeaturePyramid stride {stride} is not a power-of-2 multiple or fraction of the "
                          f"backbone stride {backbone_stride} (allowed e.g. "
                          f"{[backbone_stride * 2 ** i for i in (-2, -1, 0, 1)]})")
    return int(round(k))


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """ViTDet's neck. ``strides`` are the output strides built from the backbone map (ascending),
    ``extra_levels`` coarser ones appended by ``extra_type``; outputs follow that order."""

    def __init__(self, in_channels: int, out_channels: int = 256, backbone_stride: int = 16,
                 strides: Sequence[int] = (4, 8, 16, 32), extra_levels: int = 0, extra_type: str = "maxpool",
                 init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(backbone_stride, int) or backbone_stride <= 0:
            raise ConfigError(f"SimpleFeaturePyramid backbone_stride must be a positive integer (the backbone's "
                              f"patch size), got {backbone_stride!r}")
        strides = tuple(int(s) for s in strides)
        if not strides or list(strides) != sorted(set(strides)):
            raise ConfigError(f"SimpleFeaturePyramid strides must be a non-empty ascending sequence without "
                              f"repeats, got {strides}")
        if extra_type not in EXTRA_TYPES:
            raise ConfigError(f"SimpleFeaturePyramid: unknown extra_type {extra_type!r}; "
                              f"allowed: {', '.join(EXTRA_TYPES)}")
        if extra_levels < 0:
            raise ConfigError(f"SimpleFeaturePyramid extra_levels must be >= 0, got {extra_levels}")
        self.in_channels, self.backbone_stride = in_channels, backbone_stride
        self.strides = strides + tuple(strides[-1] * 2 ** (i + 1) for i in range(extra_levels))
        self.extra_type = extra_type
        self.scales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for s in strides:
            k = _log2_ratio(s, backbone_stride)
            layers: List[nn.Module] = []
            dim = in_channels
            if k < 0:   # finer than the backbone: deconvolutions halving the width each time
                for i in range(-k):
                    if dim % 2:
                        raise ConfigError(f"SimpleFeaturePyramid in_channels {in_channels} cannot be halved {-k} "
                                          f"times for stride {s}")
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                    dim //= 2
                    if i < -k - 1:
                        layers += [LayerNorm2d(dim), nn.GELU()]
            elif k > 0:
                layers.append(nn.MaxPool2d(kernel_size=2 ** k, stride=2 ** k))
            self.scales.append(nn.Sequential(*layers))
            self.outputs.append(nn.Sequential(
                nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(extra_levels)
        ) if extra_type == "conv" else nn.ModuleList()
        self.extra_levels = extra_levels
        # Initialisation as detectron2: the pyramid's (de)convolutions keep PyTorch's default init
        # (ViTDet's SimpleFeaturePyramid sets none); P6/P7 convolutions get c2_xavier_fill
        # (kaiming-uniform with a=1, zero bias), as detectron2's LastLevelP6P7.
        for conv in self.extra_convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        if len(inputs) != 1:
            raise ConfigError(f"SimpleFeaturePyramid takes the backbone's single map, got {len(inputs)} maps")
        x = inputs[0]
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"the backbone map has {x.shape[1]} channels, the neck (SimpleFeaturePyramid) "
                              f"in_channels={self.in_channels}: set model.neck.in_channels to the backbone's embed_dim")
        outs = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        for i in range(self.extra_levels):
            if self.extra_type == "maxpool":
                outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
            else:
                outs.append(self.extra_convs[i](outs[-1] if i == 0 else F.relu(outs[-1])))
        # timm's LayerNorm2d returns a permuted (channels-last) view, and mmcv's RoIAlign reads its input
        # as contiguous NCHW without checking the strides: every RoI feature of a two-stage head would be
        # read from the wrong places (measured on the CPU op: differences of the order of the features)
        return tuple(o.contiguous() for o in outs)
