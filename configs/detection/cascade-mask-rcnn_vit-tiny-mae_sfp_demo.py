# Tiny Cascade Mask R-CNN demo: the ViT-B Cascade Mask R-CNN config with the demo MAE ViT-tiny
# (patch 4, width 192, 4 blocks, pretrained at 48 px by `bash tools/pretrain.sh`) at a 128x128
# input (every image padded to it, as the full configs pad to 1024) and narrow heads (2-conv RPN and
# LayerNorm mask head as ViTDet's, but 2fc box heads: 4conv1fc is slow on a CPU), on the synthetic
# COCO-format set of tools/make_demo_coco.py (96-128 px images, 3 classes, polygon and crowd-RLE
# masks). Trains and evaluates boxes + masks on a 2-core CPU in about a minute:
#   .venv/bin/python tools/det_train.py configs/detection/cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py
_base_ = ['./cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py']

data_root = 'data/demo_coco/'
demo_coco = True          # tools/det_train.py / det_test.py generate data_root when it is missing
pretrained = 'runs/demo/encoder.pth'
classes = ('square', 'disc', 'triangle')
width = 64                # pyramid / head channels

image_size = 128          # the demo's input square (the full configs: 1024)
cascade_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]

model = dict(
    data_preprocessor=dict(square_size=image_size),
    backbone=dict(img_size=image_size, pretrain_img_size=48, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                  drop_path_rate=0.0, window_size=8, global_attn_indexes=(1, 3), use_rel_pos=True, with_cp=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # the patch-4 map has stride 4: strides 4-32 come from scale factors 1, 1/2, 1/4, 1/8
    neck=dict(in_channels=192, out_channels=width, backbone_stride=4),
    rpn_head=dict(in_channels=width, feat_channels=width, anchor_generator=dict(scales=[4])),   # objects of 20-80 px
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=[
            dict(type='Shared2FCBBoxHead', in_channels=width, fc_out_channels=256, roi_feat_size=7,
                 num_classes=len(classes),
                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
                 reg_class_agnostic=True,
                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
            for stds in cascade_stds],
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(num_convs=2, in_channels=width, conv_out_channels=width, num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=[dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=t, neg_iou_thr=t, min_pos_iou=t,
                                 match_low_quality=False, ignore_iof_thr=-1),
                   sampler=dict(type='RandomSampler', num=128, pos_fraction=0.25, neg_pos_ub=-1,
                                add_gt_as_proposals=True),
                   mask_size=28, pos_weight=-1, debug=False)
              for t in (0.5, 0.6, 0.7)]),
    # keep every box (up to 100 an image): a model trained for a minute still gets a full AP table
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(score_thr=0.0)))

train_pipeline = [
    dict(type='LoadImageFromFile'),       # color_type='color': grayscale JPEGs become 3-channel
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),   # polygons and crowd RLE
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True, min_size=8)))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# short schedule (14 iterations an epoch): warm-up over 8 iterations, LR x0.1 for the last epoch
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=4, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=8),
    dict(type='MultiStepLR', begin=0, end=4, by_epoch=True, milestones=[3], gamma=0.1),
]
# fp32: AMP needs a GPU (there, add --amp to tools/det_train.py)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='ViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(layer_decay=0.7),
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=5.0))
default_hooks = dict(logger=dict(type='LoggerHook', interval=4),
                     checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=2)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)   # the same demo numbers on every run (on the same machine and threads)
