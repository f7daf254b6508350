# Cascade Mask R-CNN with a Swin-B trained by `python -m finetune` (configs/finetune/swin-b_etpp_200e.yaml),
# EfficientTrain++ Table 17 / EfficientTrain Table 12's Swin-B row: the Swin-T config's detector and
# 1x recipe (multi-scale 480-800 with random crops, 4conv1fc SyncBN box heads with GIoU loss, 12
# epochs, LR x0.1 after epochs 8 and 11, 16 images per step, AdamW lr 1e-4 / weight decay 0.05) on
# Swin-B: width 128, depths 2-2-18-2, heads 4-8-16-32, drop path 0.3 (Swin's own Swin-B Cascade
# Mask R-CNN config). The papers report Swin-B 50.9 box / 44.0 mask AP (baseline) and 51.3 / 44.3
# (EfficientTrain++).
#
#   bash tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_swin-b_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/swin-b_etpp_200e/checkpoints/checkpoint-best.pth
_base_ = ['./cascade-mask-rcnn_swin-t_1x_coco.py']

# ---- user settings ------------------------------------------------------------------------------
data_root = 'data/coco/'
# a Swin-B classifier checkpoint of `python -m finetune` (timm keys) or the official
# swin_base_patch4_window7_224.pth
pretrained = 'runs/swin-b_etpp_200e/checkpoints/checkpoint-best.pth'
# --------------------------------------------------------------------------------------------------

model = dict(
    backbone=dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
