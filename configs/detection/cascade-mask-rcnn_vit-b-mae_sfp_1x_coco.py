# Cascade Mask R-CNN with an MAE-pretrained ViT-B: ViTDet's model (detectron2's
# cascade_mask_rcnn_vitdet_b_100ep: plain ViT at a fixed 1024x1024 input, simple feature pyramid,
# 2-conv RPN, 4conv1fc box heads and mask head with LayerNorm) under the papers' 1x protocol
# (EfficientTrain++ Table 17: 12 epochs, LR x0.1 after epochs 8 and 11, 16 images per step,
# single-scale resize + flip; here every image is resized to fit 1024x1024, ViTDet's input, where
# mmdet's 1x uses 1333x800). AdamW + layer-wise LR decay as ViTDet, mixed precision, activation
# checkpointing. The RoI head is mmdet's CascadeRoIHead (a mask head per stage, as the papers' 1x
# Cascade Mask R-CNN, i.e. mmdet's / ConvNeXt's); the 100ep configs use detectron2's single mask head.
# ViTDet's own recipe (LSJ, 100 epochs): cascade-mask-rcnn_vit-b-mae_vitdet_100ep_coco.py.
#
#   bash tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#
# The only settings to change are `data_root` and `pretrained` (below, or with --cfg-options: every
# field derived from them follows, with tools/det_train.py and with mmdet's own tools/train.py).
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
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

norm_cfg = dict(type='LN2d', eps=1e-6)   # LayerNorm over channels (detection/sfp.py), as ViTDet's "LN"
cascade_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
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
        strides=(4, 8, 16, 32),       # P2-P5 from the stride-16 map, P6 (RPN only) by max-pooling P5
        extra_levels=1,
        extra_type='maxpool'),
    # ViTDet: 2 convolutions in the RPN head, L1 box losses (detectron2's smooth_l1_beta=0)
    rpn_head=dict(num_convs=2, loss_bbox=dict(_delete_=True, type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        bbox_head=[
            dict(type='Shared4Conv1FCBBoxHead', in_channels=256, conv_out_channels=256, fc_out_channels=1024,
                 norm_cfg=norm_cfg, roi_feat_size=7, num_classes=80,
                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
                 reg_class_agnostic=True,
                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type='L1Loss', loss_weight=1.0))
            for stds in cascade_stds],
        mask_head=dict(norm_cfg=norm_cfg)),                  # 4 convs with LayerNorm + deconv
    train_cfg=dict(rpn=dict(allowed_border=-1),                # detectron2 trains every anchor (boundary_threshold -1)
                   rpn_proposal=dict(max_per_img=1000)))     # detectron2: 1000 proposals after NMS

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
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
