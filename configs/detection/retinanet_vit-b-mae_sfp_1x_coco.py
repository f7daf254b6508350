# RetinaNet with an MAE-pretrained ViT-B (ViTDet-style backbone + simple feature pyramid), COCO 2017,
# mmdet's 1x schedule (12 epochs, LR x0.1 after epochs 8 and 11), AdamW + layer-wise LR decay,
# mixed precision, activation checkpointing. 16 images per step in total (8 GPUs x 2).
#
#   bash tools/det_dist_train.sh configs/detection/retinanet_vit-b-mae_sfp_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/mae_vit-b_etpp_400e/encoder.pth
#
# The only settings to change are `data_root` and `pretrained` (below, or with --cfg-options through
# tools/det_train.py / det_test.py, which re-apply them to every field derived from them).
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

model = dict(
    backbone=dict(
        _delete_=True,
        type='PlainViT',
        img_size=224,                 # pretraining resolution: the position table's grid (14x14)
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        use_rel_pos=True,
        with_cp=True,                 # activation checkpointing
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

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    constructor='ViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(layer_decay=0.7),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1))

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
