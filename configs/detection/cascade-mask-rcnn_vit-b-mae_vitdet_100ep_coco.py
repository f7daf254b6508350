# Cascade Mask R-CNN with an MAE-pretrained ViT-B under ViTDet's recipe: detectron2's
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py, the setting with a published
# number (ViTDet paper and detectron2 model zoo, ViT-B MAE: 54.0 box AP / 46.7 mask AP, COCO
# val2017). The model is the 1x config's (ViTDet's); what changes is the recipe: large-scale
# jitter at 1024 (flip, resize by 0.1-2.0, 1024x1024 crop), 184375 iterations of 64 images
# (100 epochs), LR x0.1 at 88 and 96 epochs, 250-iteration linear warm-up from 0.001, AdamW
# lr 1e-4 / weight decay 0.1 / layer decay 0.7 (the 1x config's optimizer).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash tools/det_dist_train.sh \
#       configs/detection/cascade-mask-rcnn_vit-b-mae_vitdet_100ep_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#   (and NODE_RANK=1 on the second node)
#
# 64 images per step = 16 GPUs x 4 (batch_size below): two nodes of 8 GPUs, the same command on both
# with NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0> and NGPUS 8 (NGPUS is the processes per node). On
# one node of 8 GPUs set train_dataloader.batch_size=8 if memory allows, or keep 4 and add
# --cfg-options auto_scale_lr.enable=True (LR x 32/64).
_base_ = ['./cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py']

# ---- user settings (inherited: data_root, pretrained; see the 1x config) --------------------------

# detectron2's CascadeROIHeads (detection/cascade_head.py): ONE mask head, trained on the positive
# RoIs of stage 1 (IoU >= 0.5 to the ground truth) with loss weight 1 and applied once to the final
# boxes at test time (mmdet's CascadeRoIHead has one per stage, weighted 1 / 0.5 / 0.25 and averaged),
# and the three box stages' losses added with weight 1 each while the gradient into the features is
# scaled by 1/3, as detectron2 does. The 1x configs keep mmdet's CascadeRoIHead (the papers' 1x is
# mmdet's Cascade Mask R-CNN, as ConvNeXt's / Swin's).
model = dict(roi_head=dict(type='ViTDetCascadeRoIHead', stage_loss_weights=[1, 1, 1], scale_box_feature_grad=True))

# large-scale jitter (detectron2's coco_loader_lsj: flip, ResizeScale 0.1-2.0 of 1024, FixedSizeCrop
# 1024 without padding; the data preprocessor pads to the 1024 square after normalisation)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomResize', scale=(1024, 1024), ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_type='absolute_range', crop_size=(1024, 1024), recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=8, dataset=dict(pipeline=train_pipeline))

max_iters = 184375   # 100 epochs = 184375 iterations x 64 images / 118k images
interval = 5000
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=interval,
                 dynamic_intervals=[(max_iters // interval * interval + 1, max_iters)])   # and at the end
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[163889, 177546], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=interval, save_last=True, max_keep_ckpts=3))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=64)
