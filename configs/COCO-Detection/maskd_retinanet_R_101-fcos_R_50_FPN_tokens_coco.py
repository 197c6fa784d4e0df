"""MasKD stage 1 (LazyConfig): learn the receptive tokens of the RetinaNet R101-FPN teacher of the
FCOS pair. 2000 iterations at 16 images, Adam lr 0.01, weight decay 1e-3, cosine decay to 1e-6.
"""

import os

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler

from maskd import MasKDTokenLearner

_stage2 = LazyConfig.load(
    os.path.join(os.path.dirname(__file__), "maskd_retinanet_R_101-fcos_R_50_FPN_2x_coco.py")
)
dataloader = _stage2.dataloader
train = _stage2.train

model = L(MasKDTokenLearner)(
    teacher=_stage2.model.teacher,
)
optimizer = L(torch.optim.Adam)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    weight_decay=1e-3,
)
lr_multiplier = L(CosineParamScheduler)(start_value=1.0, end_value=1e-6 / 0.01)
train.max_iter = 2000
train.init_checkpoint = ""  # no student in stage 1
train.checkpointer.period = 1000
train.eval_period = 0
train.output_dir = "output/maskd_retinanet_R_101-fcos_R_50_FPN_tokens_coco"
