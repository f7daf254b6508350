# Cascade Mask R-CNN on YOUR COCO-format folder with the MAE encoder YOU pretrained, of any size the
# toolkit pretrains (ViT-Tiny/Small/Base/Large/Huge, any patch size and pretraining resolution): the
# ViT-B 1x config's detector (ViTDet's model: plain ViT, simple feature pyramid, square padding,
# 4conv1fc box heads, LayerNorm mask head) and 1x recipe, with everything that depends on the data
# or the encoder left to the files:
#   - the encoder's width, depth, heads, patch size and pretraining size come from `pretrained`
#     (detection/custom.py; None below = "from the file"), global attention in the last block of
#     each quarter (ViTDet's rule), the pyramid's input width and stride follow;
#   - `classes = None`: the category names of the training annotation file, in id order; they set
#     every dataset's metainfo and the heads' num_classes (or give a tuple of names);
#   - `image_size`: the square every image is resized to fit and padded to (ViTDet: 1024).
#
#   .venv/bin/python tools/det_train.py configs/detection/cascade-mask-rcnn_vit-mae_sfp_custom_coco.py \
#       --cfg-options data_root=/path/to/my_coco/ pretrained=runs/<my run>/encoder.pth image_size=512
#
# The folder: annotations/instances_train2017.json, annotations/instances_val2017.json, train2017/,
# val2017/ (other names: --cfg-options train_dataloader.dataset.ann_file=annotations/train.json
# train_dataloader.dataset.data_prefix.img=images/ val_dataloader.dataset.ann_file=... and
# val_evaluator.ann_file=/path/to/my_coco/annotations/val.json). Detection tests on a 16-GPU-day
# scale are not the point here: on one GPU set train_dataloader.batch_size and, for another total
# batch than 16, auto_scale_lr.enable=True. Fp32 on a CPU (amp='auto'), mixed precision on CUDA.
_base_ = ['./cascade-mask-rcnn_vit-b-mae_sfp_1x_coco.py']

# ---- user settings ------------------------------------------------------------------------------
data_root = 'data/my_coco/'
pretrained = 'runs/my_mae/encoder.pth'   # our pretraining checkpoint, encoder.pth, or an official MAE file
classes = None                           # None: from annotations/instances_train2017.json
image_size = 1024
# --------------------------------------------------------------------------------------------------

model = dict(
    data_preprocessor=dict(square_size=image_size),
    backbone=dict(img_size=image_size, patch_size=None, embed_dim=None, depth=None, num_heads=None,
                  pretrain_img_size=None, global_attn_indexes=None,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=None, backbone_stride=None))

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
