# Cascade Mask R-CNN with a Swin-T trained by `python -m finetune` (e.g.
# configs/finetune/swin-t_etpp_200e.yaml), the papers' COCO setting (EfficientTrain++ Table 17 /
# EfficientTrain Table 12: Cascade Mask R-CNN, 1x, implemented as in ConvNeXt, whose Swin-T baseline
# is Swin's own config): multi-scale training (short side 480-800, or a 384-600 crop, as DETR), 4conv1fc
# box heads with SyncBN and GIoU loss, 12 epochs, LR x0.1 after epochs 8 and 11, 16 images per step,
# AdamW lr 1e-4 / weight decay 0.05 (none for norms and relative-position tables), drop path 0.2.
# The papers report Swin-T 48.1 box / 41.5 mask AP (baseline) and 48.4 / 41.9 (EfficientTrain++).
#
#   bash tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_swin-t_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/swin-t_etpp_200e/checkpoints/checkpoint-best.pth
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['detection'], allow_failed_imports=False)
runner_type = 'DetRunner'   # re-applies data_root / pretrained; resumes under torch.load(weights_only=True)

# ---- user settings ------------------------------------------------------------------------------
# COCO 2017 root: train2017/, val2017/, annotations/instances_{train,val}2017.json
data_root = 'data/coco/'
# a Swin-T classifier checkpoint of `python -m finetune` (timm keys; model_ema is not used) or the
# official swin_tiny_patch4_window7_224.pth
pretrained = 'runs/swin-t_etpp_200e/checkpoints/checkpoint-best.pth'
# --------------------------------------------------------------------------------------------------

norm_cfg = dict(type='SyncBN', requires_grad=True)
cascade_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmSwinTransformer',   # mmdet's SwinTransformer + our timm-key loader (detection/swin.py)
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(
        bbox_head=[
            dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
                 fc_out_channels=1024, roi_feat_size=7, num_classes=80, norm_cfg=norm_cfg,
                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
                 reg_class_agnostic=False, reg_decoded_bbox=True,
                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
            for stds in cascade_stds]))

# multi-scale training with random crops (Swin's / ConvNeXt's detection recipe, from DETR)
scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333), (672, 1333),
          (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=scales, keep_ratio=True)]]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(custom_keys={'absolute_pos_embed': dict(decay_mult=0.),
                                    'relative_position_bias_table': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
