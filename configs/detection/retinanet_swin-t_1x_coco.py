# RetinaNet with a Swin-T trained by `python -m finetune` (e.g. configs/finetune/swin-t_etpp_200e.yaml),
# the papers' COCO setting (EfficientTrain Table 12 / EfficientTrain++ Table 17: RetinaNet, 1x; the
# implementation follows DAT's, as the papers say): FPN on stages 2-4 with P6/P7 from the input,
# 1333x800 resize + flip, 12 epochs, LR x0.1 after epochs 8 and 11, 16 images per step, AdamW
# lr 1e-4 / weight decay 0.05 (none for norms and relative-position tables), drop path 0.2.
# The papers report Swin-T 41.7 box AP (baseline) / 41.8 (EfficientTrain).
#
#   bash tools/det_dist_train.sh configs/detection/retinanet_swin-t_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/swin-t_etpp_200e/checkpoints/checkpoint-best.pth
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
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
        out_indices=(1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768], start_level=0, num_outs=5))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(custom_keys={'absolute_pos_embed': dict(decay_mult=0.),
                                    'relative_position_bias_table': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
