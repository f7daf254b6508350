# RetinaNet with an MAE-pretrained ViT-B: ViTDet's backbone and simple feature pyramid (plain ViT at
# a fixed 1024x1024 input; ViTDet has no RetinaNet: P3-P5 from the pyramid, P6/P7 by stride-2
# convolutions as RetinaNet's) with mmdet's RetinaNet head, under the papers' 1x protocol
# (EfficientTrain++ Table 17: 12 epochs, LR x0.1 after epochs 8 and 11, 16 images per step,
# single-scale resize + flip; here every image is resized to fit 1024x1024, where mmdet's 1x uses
# 1333x800). AdamW + layer-wise LR decay as ViTDet, mixed precision, activation checkpointing.
# ViTDet's recipe (LSJ, 100 epochs) on this model: retinanet_vit-b-mae_vitdet_100ep_coco.py.
#
#   bash tools/det_dist_train.sh configs/detection/retinanet_vit-b-mae_sfp_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#
# The only settings to change are `data_root` and `pretrained` (below, or with --cfg-options: every
# field derived from them follows, with tools/det_train.py and with mmdet's own tools/train.py).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['detection'], allow_failed_imports=False)
runner_type = 'DetRunner'   # mmengine Runner that resumes under torch.load(weights_only=True)

# ---- user settings ------------------------------------------------------------------------------
# COCO 2017 root: train2017/, val2017/, annotations/instances_{train,val}2017.json
data_root = 'data/coco/'
# MAE weights: our pretraining checkpoint, encoder.pth export, fine-tuned classifier, or the official
# mae_pretrain_vit_base.pth (see detection/README.md)
pretrained = 'runs/mae_vit-b_etpp_400e/encoder.pth'
# --------------------------------------------------------------------------------------------------

image_size = 1024   # ViTDet's input: every image fits in it and is padded to this square

model = dict(
    # pads every batch, training and testing, to image_size x image_size after normalisation
    # (detectron2's square_pad): the ViT always sees the 64x64 grid its tables are made for
    data_preprocessor=dict(type='SquarePadDataPreprocessor', square_size=image_size),
    backbone=dict(
        _delete_=True,
        type='PlainViT',
        img_size=image_size,          # detection input: global blocks' relative-position tables, 2*64-1
        pretrain_img_size=224,        # MAE pretraining input: the absolute position table's grid (14x14)
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,               # window blocks' relative-position tables: 2*14-1
        global_attn_indexes=(2, 5, 8, 11),
        use_rel_pos=True,
        with_cp=True,                 # activation checkpointing (same numbers, less memory)
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=768,
        out_channels=256,
        backbone_stride=16,
        strides=(8, 16, 32),          # P3-P5 from the stride-16 map, then P6/P7 by stride-2 convs
        extra_levels=2,
        extra_type='conv'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
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
train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# ViTDet's optimizer: AdamW lr 1e-4, weight decay 0.1 except LayerNorms of the ViT and the position
# table (detectron2's weight_decay_norm=0 + pos_embed override), layer-wise LR decay 0.7 over 12 blocks
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    constructor='ViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(layer_decay=0.7, weight_decay_rule='vitdet'),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1))

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
