# Tiny Cascade Mask R-CNN demo: the ViT-B Cascade Mask R-CNN config with the demo MAE ViT-tiny
# (patch 4, width 192, 4 blocks, pretrained at 48 px by `bash tools/pretrain.sh`) at a 64x64
# input (every image padded to it, as the full configs pad to 1024) and narrow heads (2-conv RPN and
# LayerNorm mask head as ViTDet's, but 2fc box heads: 4conv1fc is slow on a CPU), on the synthetic
# COCO-format set of tools/make_demo_coco.py (600 images of 48-64 px, 3 classes, polygon and
# crowd-RLE masks). Learns to 58 box / 58 mask AP in about 3.5 minutes on one CPU core
# (bash tools/det_train.sh trains it beside the RetinaNet demo, one core each):
#   .venv/bin/python tools/det_train.py configs/detection/cascade-mask-rcnn_vit-tiny-mae_sfp_demo.py
_base_ = ['./cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py']

data_root = 'data/demo_coco/'
demo_coco = True          # tools/det_train.py / det_test.py generate data_root when it is missing
pretrained = 'runs/demo/encoder.pth'
classes = ('square', 'disc', 'triangle')
width = 64                # pyramid / head channels

image_size = 64           # the demo's input square (the full configs: 1024)
cascade_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]

model = dict(
    data_preprocessor=dict(square_size=image_size),
    backbone=dict(img_size=image_size, pretrain_img_size=48, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                  drop_path_rate=0.0, window_size=8, global_attn_indexes=(1, 3), use_rel_pos=True, with_cp=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # the patch-4 map has stride 4: strides 4-32 come from scale factors 1, 1/2, 1/4, 1/8
    neck=dict(in_channels=192, out_channels=width, backbone_stride=4),
    rpn_head=dict(in_channels=width, feat_channels=width,
                  anchor_generator=dict(scales=[3, 4, 5, 6])),   # objects of 16-40 px: anchors 12-24 at stride 4
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
        mask_roi_extractor=dict(out_channels=width, roi_layer=dict(output_size=7)),   # 14x14 masks
        mask_head=dict(num_convs=2, in_channels=width, conv_out_channels=width, num_classes=len(classes))),
    # 1-3 objects an image: few proposals and RoIs keep a step cheap
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=200, max_per_img=64),
        rcnn=[dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=t, neg_iou_thr=t, min_pos_iou=t,
                                 match_low_quality=False, ignore_iof_thr=-1),
                   sampler=dict(type='RandomSampler', num=32, pos_fraction=0.25, neg_pos_ub=-1,
                                add_gt_as_proposals=True),
                   mask_size=14, pos_weight=-1, debug=False)
              for t in (0.5, 0.6, 0.7)]),
    # keep every box (up to 100 an image): the AP table counts low-scoring boxes too
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50), rcnn=dict(score_thr=0.0)))

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
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True, min_size=8)))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# short schedule (66 iterations an epoch): warm-up over 30 iterations, LR x0.1 for the last epoch;
# evaluated once, at the end (tools/det_test.py evaluates the final checkpoint again with a picture)
max_epochs = 4
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[max_epochs - 1], gamma=0.1),
]
# fp32: AMP needs a GPU (there, add --amp to tools/det_train.py)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='ViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(layer_decay=0.8),
    # 1e-3: 2e-3 learned about half as well (measured after 3 epochs: 26 vs 50 box AP)
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=5.0))
default_hooks = dict(logger=dict(type='LoggerHook', interval=20),
                     checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=8)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)   # the same demo numbers on every run (on the same machine and threads)
