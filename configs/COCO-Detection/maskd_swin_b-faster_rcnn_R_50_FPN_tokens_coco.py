"""MasKD stage 1 (LazyConfig): the receptive tokens of the Swin-B Cascade Mask R-CNN teacher.

As the ViTDet pair's stage 1 (the R101 row's token recipe on the teacher's own LSJ data at 1024,
RGB, with masks), with this teacher.
"""

import os

from detectron2.config import LazyConfig

_here = os.path.dirname(__file__)
_vitdet = LazyConfig.load(os.path.join(_here, "maskd_vitdet_b-faster_rcnn_R_50_FPN_tokens_coco.py"))
_stage2 = LazyConfig.load(os.path.join(_here, "maskd_swin_b-faster_rcnn_R_50_FPN_2x_coco.py"))
_teacher = LazyConfig.load(
    os.path.join(_here, "..", "Teachers", "cascade_mask_rcnn_swin_b_in21k_50ep.py")
)

dataloader = _teacher.dataloader
dataloader.train.total_batch_size = 16
optimizer = _vitdet.optimizer
lr_multiplier = _vitdet.lr_multiplier
train = _vitdet.train
model = _vitdet.model
model.teacher = _stage2.model.teacher
train.output_dir = "output/maskd_swin_b-faster_rcnn_R_50_FPN_tokens_coco"
