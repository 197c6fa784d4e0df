"""MasKD stage 2 (LazyConfig), a heterogeneous pair: Faster R-CNN R50-FPN <- ViTDet ViT-B Mask
R-CNN (detectron2's ViTDet project; 51.6 box AP published by detectron2).

What differs between the two, and what MasKD does about it (see docs/heterogeneous.md):
- channel order: the data are loaded in the student's BGR; the teacher gets them as RGB;
- normalisation: each model applies its own pixel mean/std (teacher ImageNet RGB mean/std,
  student caffe BGR mean, std 1);
- padding: the teacher pads to a 1024 square, the student to a multiple of 32; both feature maps
  of a level are cut to their common grid and only the image area enters loss and masks;
- levels: the SimpleFeaturePyramid's p2-p6 and the student's FPN p2-p6 (same names, same
  strides); channels 256 and 256 through the 1x1 align convs.
Training images are at most 1024 px (the teacher's square): large-scale jitter at 1024, the
ViTDet project's data recipe, in BGR and without masks. Evaluation: the student's standard
800/1333. Student schedule, loss weight, warm-up and RoI box-regression KD as the paper's
Faster R-CNN row; no inheriting (the teacher's neck and 4conv1fc box head are not the student's).
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from maskd import build_teacher

_here = os.path.dirname(__file__)
_base = LazyConfig.load(
    os.path.join(_here, "maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.py")
)
_lsj = LazyConfig.load(os.path.join(_here, "..", "common", "coco_lsj_1024.py")).dataloader

dataloader = _base.dataloader
dataloader.train.mapper.augmentations = _lsj.train.mapper.augmentations
dataloader.train.mapper.recompute_boxes = False  # no masks: boxes are cropped with the image
optimizer = _base.optimizer
train = _base.train
lr_multiplier = _base.lr_multiplier

# the R101 row's MasKD settings (loss weight 1, warm-up 7330, RoI box-regression KD) with this
# teacher, and no inheriting: the teacher's neck and box head are not the student's
model = _base.model
model.teacher = L(build_teacher)(
    config_file=os.path.join(_here, "..", "Teachers", "mask_rcnn_vitdet_b_100ep.py"),
    weights="detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl",
)
model.tokens.weights = "output/maskd_vitdet_b-faster_rcnn_R_50_FPN_tokens_coco/model_final.pth"
model.inherit = False
train.output_dir = "output/maskd_vitdet_b-faster_rcnn_R_50_FPN_2x_coco"
