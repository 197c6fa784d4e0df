"""Teacher config: ViTDet, ViT-B Mask R-CNN, 100 epochs (detectron2's ViTDet project).

The model of detectron2's ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py``, which
is ``common/models/mask_rcnn_vitdet.py`` of detectron2's model zoo (shipped in its package),
with the project's LSJ data; the project's configs are not in detectron2's package, so MasKD
builds the teacher from this file. Published by detectron2 (ViTDet project README, COCO):
51.6 box AP, 45.9 mask AP, model id 325346929; weights in ``train.init_checkpoint``.

What makes it a heterogeneous teacher for a ResNet-FPN student: RGB input with ImageNet
mean/std, padding to a 1024 x 1024 square, a plain ViT with a SimpleFeaturePyramid (levels
p2-p6, strides 4-64, 256 channels). Evaluate it here with
``train_net.py --config-file configs/Teachers/mask_rcnn_vitdet_b_100ep.py --eval-only``.
"""

import os

from detectron2.config import LazyConfig
from detectron2.model_zoo import get_config

model = get_config("common/models/mask_rcnn_vitdet.py").model

dataloader = LazyConfig.load(
    os.path.join(os.path.dirname(__file__), "..", "common", "coco_lsj_1024.py")
).dataloader
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = True

train = get_config("common/train.py").train
train.init_checkpoint = (
    "detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl"
)
train.output_dir = "output/teacher_mask_rcnn_vitdet_b_100ep"
