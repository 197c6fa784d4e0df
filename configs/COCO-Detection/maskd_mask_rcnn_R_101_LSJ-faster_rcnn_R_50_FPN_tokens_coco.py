"""MasKD stage 1 (LazyConfig): the receptive tokens of the LSJ Mask R-CNN R101-FPN teacher.

The token recipe of the Faster R-CNN R101 row (2000 iterations at 16 images, SGD lr 0.1, cosine
decay to 1e-6) on the teacher's own data (detectron2's new-baselines large-scale jitter at 1024,
padded crops, with masks) and evaluation. Only the tokens are trained; the teacher's SyncBN
layers stay in inference mode.
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.model_zoo import get_config

from maskd import MasKDTokenLearner

_here = os.path.dirname(__file__)
_recipe = LazyConfig.load(
    os.path.join(_here, "maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_tokens_coco.py")
)
_stage2 = LazyConfig.load(
    os.path.join(_here, "maskd_mask_rcnn_R_101_LSJ-faster_rcnn_R_50_FPN_2x_coco.py")
)

dataloader = get_config("new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py").dataloader
dataloader.train.total_batch_size = 16
optimizer = _recipe.optimizer
lr_multiplier = _recipe.lr_multiplier
train = _recipe.train

model = L(MasKDTokenLearner)(teacher=_stage2.model.teacher)
train.output_dir = "output/maskd_mask_rcnn_R_101_LSJ-faster_rcnn_R_50_FPN_tokens_coco"
