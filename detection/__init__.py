"""MMDetection 3.x plug-in (ViT backbone, simple feature pyramid, layer-decay optimizer).

The only package of the toolkit that imports mmdet / mmcv / mmengine.
"""
