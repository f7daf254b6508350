"""ViTDet's Cascade RoI head: three box stages and ONE mask head, trained and applied as
detectron2's ``CascadeROIHeads`` does.

mmdet's ``CascadeRoIHead`` builds a mask head per stage (the one ``mask_head`` dict copied three
times), trains each on its own stage's samples with the stage's loss weight (1 / 0.5 / 0.25) and
averages the three at test time. detectron2 (``modeling/roi_heads/cascade_rcnn.py``, used by
ViTDet's ``cascade_mask_rcnn_vitdet_*`` configs) has one mask head:

- training: it sees the positive RoIs of the FIRST stage, i.e. the RPN proposals (plus the ground
  truth boxes) sampled for stage 1 and matched at IoU >= 0.5 (``CascadeROIHeads.forward`` passes the
  proposals it labelled before the box cascade to ``_forward_mask``, which keeps the foreground
  ones); its loss has weight 1;
- testing: it runs once on the final detections (boxes of the last stage, scores averaged over the
  stages, after NMS); nothing is averaged.

:class:`ViTDetCascadeRoIHead` does exactly that on top of mmdet's class: ``mask_head`` /
``mask_roi_extractor`` are single modules, the stage-1 sampling results train the mask (loss
``s0.loss_mask``, weight ``stage_loss_weights[0]``), later stages add no mask loss, and
``predict_mask`` runs the one head on the final boxes.

detectron2 also weighs the box stages differently from mmdet: it adds the three stages' box
losses with weight 1 each and scales the gradient that flows from each stage's pooled features
back into the backbone by 1 / num_stages ("the original implementation averages the losses
among heads, but scale up the parameter gradients of the heads"). ``scale_box_feature_grad=True``
with ``stage_loss_weights=[1, 1, 1]`` reproduces that (the ViTDet configs set both); the default
``False`` keeps mmdet's behaviour.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from mmdet.models.roi_heads import CascadeRoIHead
from mmdet.models.utils import empty_instances
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmdet.utils import ConfigType, InstanceList


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


@MODELS.register_module()
class ViTDetCascadeRoIHead(CascadeRoIHead):
    """mmdet's ``CascadeRoIHead`` with detectron2's single mask head (see the module docstring).

    Args:
        mask_head / mask_roi_extractor: ONE config each (a list is refused: that is mmdet's
            per-stage form); the extractor defaults to the box extractor of stage 1.
        scale_box_feature_grad: scale the gradient of every stage's pooled box features by
            ``1 / num_stages`` in training (detectron2's ``_ScaleGradient``).
        Everything else as ``CascadeRoIHead``.
    """

    def __init__(self, *args, scale_box_feature_grad: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale_box_feature_grad = bool(scale_box_feature_grad)

    # ---- construction ---------------------------------------------------------------------
    def init_mask_head(self, mask_roi_extractor: ConfigType, mask_head: ConfigType) -> None:
        for name, value in (("mask_head", mask_head), ("mask_roi_extractor", mask_roi_extractor)):
            if isinstance(value, (list, tuple)):
                raise ValueError(f"ViTDetCascadeRoIHead has one {name} (detectron2's cascade); got a list of "
                                 f"{len(value)}: give one dict, or use mmdet's CascadeRoIHead for one per stage")
        self.mask_head = MODELS.build(mask_head)
        if mask_roi_extractor is not None:
            self.share_roi_extractor = False
            self.mask_roi_extractor = MODELS.build(mask_roi_extractor)
        else:
            self.share_roi_extractor = True
            self.mask_roi_extractor = self.bbox_roi_extractor[0]

    # ---- box stages -----------------------------------------------------------------------
    def _bbox_forward(self, stage: int, x: Tuple[Tensor], rois: Tensor) -> dict:
        extractor = self.bbox_roi_extractor[stage]
        feats = extractor(x[:extractor.num_inputs], rois)
        if self.scale_box_feature_grad and self.training:
            feats = _ScaleGrad.apply(feats, 1.0 / self.num_stages)
        cls_score, bbox_pred = self.bbox_head[stage](feats)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=feats)

    # ---- the one mask head ----------------------------------------------------------------
    def _mask_forward(self, stage: int, x: Tuple[Tensor], rois: Tensor) -> dict:
        """The single mask head on ``rois`` (``stage`` is ignored: every stage shares it)."""
        feats = self.mask_roi_extractor(x[:self.mask_roi_extractor.num_inputs], rois)
        return dict(mask_preds=self.mask_head(feats))

    def mask_loss(self, stage: int, x: Tuple[Tensor], sampling_results: List, batch_gt_instances: InstanceList
                  ) -> dict:
        """The mask loss on the positive RoIs of stage 1 (``stage == 0``); no mask loss from the
        later stages (mmdet's loop calls this once per stage and adds what it returns)."""
        if stage != 0:
            return dict(loss_mask={})
        pos_rois = bbox2roi([res.pos_priors for res in sampling_results])
        results = self._mask_forward(0, x, pos_rois)
        results.update(self.mask_head.loss_and_target(
            mask_preds=results["mask_preds"], sampling_results=sampling_results,
            batch_gt_instances=batch_gt_instances, rcnn_train_cfg=self.train_cfg[0]))
        return results

    def predict_mask(self, x: Tuple[Tensor], batch_img_metas: List[dict], results_list: InstanceList,
                     rescale: bool = False) -> InstanceList:
        """The single mask head on the final boxes of every image (no averaging over stages)."""
        rois = bbox2roi([res.bboxes for res in results_list])
        if rois.shape[0] == 0:
            return empty_instances(batch_img_metas, rois.device, task_type="mask", instance_results=results_list,
                                   mask_thr_binary=self.test_cfg.mask_thr_binary)
        preds = self._mask_forward(-1, x, rois)["mask_preds"].split([len(r) for r in results_list], 0)
        return self.mask_head.predict_by_feat(mask_preds=preds, results_list=results_list,
                                              batch_img_metas=batch_img_metas, rcnn_test_cfg=self.test_cfg,
                                              rescale=rescale)

    def forward(self, x: Tuple[Tensor], rpn_results_list: InstanceList, batch_data_samples) -> tuple:
        """Tensor-mode forward (mmdet's ``_forward``): the box cascade, then the mask head once on
        the last stage's RoIs."""
        metas = [s.metainfo for s in batch_data_samples]
        proposals = [r.bboxes for r in rpn_results_list]
        counts = tuple(len(p) for p in proposals)
        rois, cls_scores, bbox_preds = self._refine_roi(x, bbox2roi(proposals), metas, counts)
        results: tuple = (cls_scores, bbox_preds)
        if self.with_mask:
            masks = self._mask_forward(-1, x, torch.cat(rois))["mask_preds"].sigmoid().split(counts, 0)
            results = results + (list(masks),)
        return results


__all__ = ["ViTDetCascadeRoIHead"]
