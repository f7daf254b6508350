"""MMDetection 3.x plug-in: ViTDet's plain-ViT backbone (``PlainViT``), simple feature pyramid
(``SimpleFeaturePyramid``, and the channel LayerNorm ``LN2d`` for the heads' ``norm_cfg``), the
fixed-square padding of every batch (``SquarePadDataPreprocessor``), layer-wise lr-decay
optimizer constructor (``ViTLayerDecayOptimizerConstructor``) and a runner that re-applies
``data_root`` / ``pretrained`` and resumes its own checkpoints under
``torch.load(weights_only=True)`` (``DetRunner``); mmdet's Swin loading our fine-tuned timm Swin
checkpoints with a key report (``TimmSwinTransformer``); detectron2's Cascade RoI head with one mask
head (``ViTDetCascadeRoIHead``).

Configs import it with ``custom_imports = dict(imports=['detection'], allow_failed_imports=False)``;
importing registers everything. The only package of the toolkit that imports mmdet / mmcv / mmengine.
"""
from .cascade_head import ViTDetCascadeRoIHead
from .checkpoint_io import CheckpointMismatchError, KeyReport, load_backbone_checkpoint, map_state_dict
from .layer_decay import ViTLayerDecayOptimizerConstructor
from .preprocess import SquarePadDataPreprocessor
from .runner import DetRunner
from .safe_load import mmengine_checkpoint_globals
from .sfp import SimpleFeaturePyramid
from .swin import TimmSwinTransformer
from .vit import PlainViT

__all__ = ["PlainViT", "SimpleFeaturePyramid", "ViTDetCascadeRoIHead", "SquarePadDataPreprocessor", "TimmSwinTransformer",
           "ViTLayerDecayOptimizerConstructor", "DetRunner",
           "CheckpointMismatchError", "KeyReport", "load_backbone_checkpoint", "map_state_dict",
           "mmengine_checkpoint_globals"]
