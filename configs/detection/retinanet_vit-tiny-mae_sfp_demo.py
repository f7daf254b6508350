# Tiny RetinaNet demo: the ViT-B RetinaNet config with the demo MAE ViT-tiny (patch 4, width 192,
# 4 blocks, pretrained at 48 px by `bash tools/pretrain.sh`) at a 64x64 input (every image padded
# to it, as the full configs pad to 1024) and narrow heads, on the synthetic COCO-format set of
# tools/make_demo_coco.py (600 images of 48-64 px, 3 classes). Learns to 29 box AP in about
# 4.5 minutes on one CPU core (bash tools/det_train.sh trains it beside the Cascade demo):
#   .venv/bin/python tools/det_train.py configs/detection/retinanet_vit-tiny-mae_sfp_demo.py
_base_ = ['./retinanet_vit-b-mae_sfp_1x_coco.py']

data_root = 'data/demo_coco/'
demo_coco = True          # tools/det_train.py / det_test.py generate data_root when it is missing
pretrained = 'runs/demo/encoder.pth'
classes = ('square', 'disc', 'triangle')

image_size = 64           # the demo's input square (the full configs: 1024)

model = dict(
    data_preprocessor=dict(square_size=image_size),
    backbone=dict(img_size=image_size, pretrain_img_size=48, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                  drop_path_rate=0.0, window_size=8, global_attn_indexes=(1, 3), use_rel_pos=True, with_cp=False,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # the patch-4 map has stride 4: the same strides 8-128 come from other scale factors
    neck=dict(in_channels=192, out_channels=64, backbone_stride=4),
    bbox_head=dict(num_classes=len(classes), in_channels=64, feat_channels=64, stacked_convs=2,
                   anchor_generator=dict(octave_base_scale=2)),   # objects of 16-40 px
    # keep every box (up to 100 an image): a model trained for a minute still gets a full AP table
    test_cfg=dict(score_thr=0.0))

train_pipeline = [
    dict(type='LoadImageFromFile'),       # color_type='color': grayscale JPEGs become 3-channel
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
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
max_epochs = 8
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
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=5.0))
default_hooks = dict(logger=dict(type='LoggerHook', interval=20),
                     checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=8)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)   # the same demo numbers on every run (on the same machine and threads)
