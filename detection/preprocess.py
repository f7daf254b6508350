"""Fixed-size square padding of every batch, in training and testing (ViTDet's ``square_pad``).

mmdet's ``DetDataPreprocessor`` pads a batch to its largest image (rounded up to
``pad_size_divisor``), so a ViT's position embeddings, resampled to the padded token grid, would
depend on which images share the batch, and differ between training and testing.
:class:`SquarePadDataPreprocessor` pads every batch, after normalisation, with zeros to one
``square_size`` square (ViTDet: 1024, detectron2's ``square_pad``); the backbone then always sees
the grid its relative-position tables were made for (``PlainViT.img_size``). mmdet's
``BatchFixedSizePad`` batch augment does the same but in training only.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmdet.registry import MODELS

from engine.config import ConfigError


@MODELS.register_module()
class SquarePadDataPreprocessor(DetDataPreprocessor):
    """``DetDataPreprocessor`` that pads every batch (training and testing) to ``square_size`` x
    ``square_size`` with ``pad_value`` (0 = the mean pixel after normalisation, as detectron2);
    ``batch_input_shape`` and ``pad_shape`` say so, and in training the instance masks are padded
    along (``pad_mask=True``). An image larger than the square is a configuration error (the
    pipeline's resize / crop must keep images within it)."""

    def __init__(self, square_size: int = 1024, pad_size_divisor: int = 1, **kwargs) -> None:
        if not isinstance(square_size, int) or square_size <= 0 or square_size % max(pad_size_divisor, 1):
            raise ConfigError(f"SquarePadDataPreprocessor square_size must be a positive multiple of "
                              f"pad_size_divisor {pad_size_divisor}, got {square_size!r}")
        super().__init__(pad_size_divisor=pad_size_divisor, **kwargs)
        self.square_size = square_size

    def forward(self, data: dict, training: bool = False) -> dict:
        size = self.square_size
        for img in data["inputs"]:
            h, w = img.shape[-2:]
            if h > size or w > size:
                raise ConfigError(f"an image of {h}x{w} (after the data pipeline) does not fit "
                                  f"model.data_preprocessor.square_size={size}: the pipeline's Resize / RandomCrop "
                                  f"must keep images within it (e.g. Resize scale=({size}, {size}), keep_ratio=True)")
        data = super().forward(data=data, training=training)
        inputs, samples = data["inputs"], data["data_samples"]
        h, w = inputs.shape[-2:]
        if (h, w) != (size, size):
            inputs = F.pad(inputs, (0, size - w, 0, size - h), value=self.pad_value)
            if samples is not None:
                for sample in samples:
                    sample.set_metainfo({"batch_input_shape": (size, size), "pad_shape": (size, size)})
                if self.pad_mask and training:
                    self.pad_gt_masks(samples)
        return {"inputs": inputs, "data_samples": samples}


def square_size_of(model_cfg: dict) -> Optional[int]:
    """The square a model config pads to, or ``None`` when its preprocessor is another one."""
    pre = model_cfg.get("data_preprocessor") or {}
    if str(pre.get("type", "")).split(".")[-1] != "SquarePadDataPreprocessor":
        return None
    return pre.get("square_size", 1024)
