"""MasKD stage 1 (LazyConfig): the receptive tokens of the ViTDet ViT-B Mask R-CNN teacher.

The token recipe of the Faster R-CNN R101 row (2000 iterations at 16 images, SGD lr 0.1, cosine
decay to 1e-6; the demo found it keeps the teacher's accuracy) on the teacher's own data (LSJ
at 1024 in RGB, with masks for its mask loss) and evaluation (shortest edge 1024, at most 1024).
Only the tokens are trained.
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from maskd import MasKDTokenLearner

_here = os.path.dirname(__file__)
_recipe = LazyConfig.load(
    os.path.join(_here, "maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_tokens_coco.py")
)
_stage2 = LazyConfig.load(os.path.join(_here, "maskd_vitdet_b-faster_rcnn_R_50_FPN_2x_coco.py"))
_teacher = LazyConfig.load(os.path.join(_here, "..", "Teachers", "mask_rcnn_vitdet_b_100ep.py"))

dataloader = _teacher.dataloader
dataloader.train.total_batch_size = 16
optimizer = _recipe.optimizer
lr_multiplier = _recipe.lr_multiplier
train = _recipe.train

model = L(MasKDTokenLearner)(teacher=_stage2.model.teacher)
train.output_dir = "output/maskd_vitdet_b-faster_rcnn_R_50_FPN_tokens_coco"
