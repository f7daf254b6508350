# RetinaNet with an MAE-pretrained ViT-B under ViTDet's recipe: the 1x config's model (ViTDet's
# backbone and simple feature pyramid, P6/P7 convolutions, mmdet's RetinaNet head) trained as
# detectron2's cascade_mask_rcnn_vitdet_b_100ep: large-scale jitter at 1024 (flip, resize by 0.1-2.0,
# 1024x1024 crop), 184375 iterations of 64 images (100 epochs), LR x0.1 at 88 and 96 epochs,
# 250-iteration linear warm-up, AdamW lr 1e-4 / weight decay 0.1 / layer decay 0.7. ViTDet
# publishes no RetinaNet number; this is the same recipe on the one-stage detector.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash tools/det_dist_train.sh \
#       configs/detection/retinanet_vit-b-mae_vitdet_100ep_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#   (and NODE_RANK=1 on the second node)
#
# 64 images per step = 16 GPUs x 4 (batch_size below): two nodes of 8; with fewer, see the Cascade
# 100ep config.
_base_ = ['./retinanet_vit-b-mae_sfp_1x_coco.py']

# ---- user settings (inherited: data_root, pretrained; see the 1x config) --------------------------

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
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
