"""MasKD stage 1 (LazyConfig): learn the receptive tokens of the Faster R-CNN R101-FPN teacher.

2000 iterations at 16 images, cosine decay to 1e-6, SGD lr 0.1 (the paper's setting for this
teacher). Only the tokens are trained; the teacher's weights are loaded when the model is built.
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from fvcore.common.param_scheduler import CosineParamScheduler

from maskd import MasKDTokenLearner

# The stage-2 config of this pair (file names with "-" cannot be imported as modules).
_stage2 = LazyConfig.load(
    os.path.join(
        os.path.dirname(__file__), "maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.py"
    )
)
dataloader = _stage2.dataloader
optimizer = _stage2.optimizer
train = _stage2.train

model = L(MasKDTokenLearner)(
    teacher=_stage2.model.teacher,
)
optimizer.lr = 0.1
lr_multiplier = L(CosineParamScheduler)(start_value=1.0, end_value=1e-6 / 0.1)
train.max_iter = 2000
train.init_checkpoint = ""  # no student in stage 1
train.checkpointer.period = 1000
train.eval_period = 0
train.output_dir = "output/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_tokens_coco_lazy"
