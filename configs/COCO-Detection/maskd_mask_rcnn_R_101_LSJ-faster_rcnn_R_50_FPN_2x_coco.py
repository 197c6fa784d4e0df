"""MasKD stage 2 (LazyConfig), a heterogeneous pair: Faster R-CNN R50-FPN <- Mask R-CNN R101-FPN,
large-scale jitter, 400 epochs (detectron2's "new baselines"; 48.9 box AP published by detectron2).

Same channel order (BGR), same padding (multiples of 32) and same levels (p2-p6) as the student,
but another normalisation: the teacher divides by ImageNet's pixel std (SyncBN ResNet trained
from scratch), the caffe-style student by 1; each model normalises the batch itself. The data
and evaluation are the student's standard ones (multi-scale 640-800 / 1333, within the scales the
teacher was trained on), so both see the same padded batch and the padding is distilled as in
the published method. Recipe as the paper's Faster R-CNN row (loss weight 1, warm-up 7330, RoI
box-regression KD), without inheriting (the teacher's 4conv1fc head and SyncBN FPN are not the
student's).
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from maskd import build_teacher

_here = os.path.dirname(__file__)
_base = LazyConfig.load(
    os.path.join(_here, "maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.py")
)

dataloader = _base.dataloader
optimizer = _base.optimizer
train = _base.train
lr_multiplier = _base.lr_multiplier

# the R101 row's MasKD settings (loss weight 1, warm-up 7330, RoI box-regression KD) with this
# teacher, and no inheriting: the teacher's neck and box head are not the student's
model = _base.model
model.teacher = L(build_teacher)(
    config_file="new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py",
    weights=(
        "detectron2://new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ/42073830/"
        "model_final_f96b26.pkl"
    ),
)
model.tokens.weights = (
    "output/maskd_mask_rcnn_R_101_LSJ-faster_rcnn_R_50_FPN_tokens_coco/model_final.pth"
)
model.inherit = False
train.output_dir = "output/maskd_mask_rcnn_R_101_LSJ-faster_rcnn_R_50_FPN_2x_coco"
