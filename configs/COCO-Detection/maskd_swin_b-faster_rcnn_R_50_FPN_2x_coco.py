"""MasKD stage 2 (LazyConfig), a heterogeneous pair: Faster R-CNN R50-FPN <- Swin-B Cascade Mask
R-CNN, ImageNet-21k, 50 epochs (detectron2's ViTDet project; 53.9 box AP published by
detectron2).

The ViTDet pair's config (same student, data and alignment: the BGR data reach the teacher as
RGB, each model normalises itself, the teacher pads to a 1024 square so only the image area
enters loss and masks, levels p2-p6 on both sides) with this teacher: Swin stages under an FPN
with LayerNorm, cascade heads. Recipe as the paper's stronger-teacher Faster R-CNN row: loss
weight 1, warm-up 5000, RoI box-regression KD against the cascade's first stage, no inheriting.
"""

import os

from detectron2.config import LazyConfig

_here = os.path.dirname(__file__)
_vitdet = LazyConfig.load(os.path.join(_here, "maskd_vitdet_b-faster_rcnn_R_50_FPN_2x_coco.py"))

dataloader = _vitdet.dataloader
optimizer = _vitdet.optimizer
train = _vitdet.train
lr_multiplier = _vitdet.lr_multiplier

model = _vitdet.model
model.teacher.config_file = os.path.join(
    _here, "..", "Teachers", "cascade_mask_rcnn_swin_b_in21k_50ep.py"
)
model.teacher.weights = (
    "detectron2://ViTDet/COCO/cascade_mask_rcnn_swin_b_in21k/f342979038/model_final_246a82.pkl"
)
model.tokens.weights = "output/maskd_swin_b-faster_rcnn_R_50_FPN_tokens_coco/model_final.pth"
model.custom_mask_warmup = 5000
train.output_dir = "output/maskd_swin_b-faster_rcnn_R_50_FPN_2x_coco"
