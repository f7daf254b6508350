# Cascade Mask R-CNN with an MAE-pretrained ViT-L: the ViT-B config with ViT-L's width / depth /
# heads and ViTDet's ViT-L settings (global attention every 6th block, drop path 0.4, layer decay 0.8).
_base_ = ['./cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py']

# ---- user settings (see the ViT-B config) ------------------------------------------------------
data_root = 'data/coco/'
pretrained = 'runs/mae_vit-l_etpp_400e/encoder.pth'
# --------------------------------------------------------------------------------------------------

model = dict(
    backbone=dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4,
                  global_attn_indexes=(5, 11, 17, 23),
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=1024))

train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

optim_wrapper = dict(paramwise_cfg=dict(layer_decay=0.8))   # weight_decay_rule='vitdet' from the ViT-B config
