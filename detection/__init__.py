"""MMDetection 3.x plug-in: ViTDet-style plain-ViT backbone (``PlainViT``), simple feature
pyramid (``SimpleFeaturePyramid``), layer-wise lr-decay optimizer constructor
(``ViTLayerDecayOptimizerConstructor``) and a runner that can resume its own checkpoints under
``torch.load(weights_only=True)`` (``DetRunner``).

Configs import it with ``custom_imports = dict(imports=['detection'], allow_failed_imports=False)``;
importing registers everything. The only package of the toolkit that imports mmdet / mmcv / mmengine.
"""
from .checkpoint_io import CheckpointMismatchError, KeyReport, load_backbone_checkpoint, map_state_dict
from .layer_decay import ViTLayerDecayOptimizerConstructor
from .runner import DetRunner, mmengine_checkpoint_globals
from .sfp import SimpleFeaturePyramid
from .vit import PlainViT

__all__ = ["PlainViT", "SimpleFeaturePyramid", "ViTLayerDecayOptimizerConstructor", "DetRunner",
           "CheckpointMismatchError", "KeyReport", "load_backbone_checkpoint", "map_state_dict",
           "mmengine_checkpoint_globals"]
