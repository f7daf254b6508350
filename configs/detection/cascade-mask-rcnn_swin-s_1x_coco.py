# Cascade Mask R-CNN with a Swin-S trained by `python -m finetune` (configs/finetune/swin-s_etpp_200e.yaml),
# EfficientTrain++ Table 17 / EfficientTrain Table 12's Swin-S row: the Swin-T config's detector and
# 1x recipe (multi-scale 480-800 with random crops, 4conv1fc SyncBN box heads with GIoU loss, 12
# epochs, LR x0.1 after epochs 8 and 11, 16 images per step, AdamW lr 1e-4 / weight decay 0.05) on
# Swin-S: depths 2-2-18-2, drop path 0.2 (Swin's own Swin-S Cascade Mask R-CNN config).
# The papers report Swin-S 50.0 box / 43.1 mask AP (baseline) and 50.7 / 43.7 (EfficientTrain++).
#
#   bash tools/det_dist_train.sh configs/detection/cascade-mask-rcnn_swin-s_1x_coco.py 8 \
#       --cfg-options data_root=/data/coco/ pretrained=runs/swin-s_etpp_200e/checkpoints/checkpoint-best.pth
_base_ = ['./cascade-mask-rcnn_swin-t_1x_coco.py']

# ---- user settings ------------------------------------------------------------------------------
data_root = 'data/coco/'
# a Swin-S classifier checkpoint of `python -m finetune` (timm keys) or the official
# swin_small_patch4_window7_224.pth
pretrained = 'runs/swin-s_etpp_200e/checkpoints/checkpoint-best.pth'
# --------------------------------------------------------------------------------------------------

model = dict(
    backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
