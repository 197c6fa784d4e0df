"""Teacher config: Swin-B Cascade Mask R-CNN, ImageNet-21k pre-training, 50 epochs (detectron2's
ViTDet project).

The model of detectron2's ``projects/ViTDet/configs/COCO/cascade_mask_rcnn_swin_b_in21k_50ep.py``
(a Swin-B backbone, SwinTransformer of ``detectron2.modeling``, in place of the MViTv2 of the
project's ``cascade_mask_rcnn_mvitv2_b_in21k_100ep.py``, whose FPN with LayerNorm, 2-conv RPN
head and three-stage cascade with 4conv1fc LN box heads it keeps), written out here because the
project's configs are not in detectron2's package. Published by detectron2 (ViTDet project
README, COCO, Cascade Mask R-CNN): 53.9 box AP, 46.2 mask AP, model id 342979038; weights in
``train.init_checkpoint``.

Heterogeneous for a ResNet-FPN student: RGB with ImageNet mean/std, padding to a 1024 square,
Swin stages p0-p3 under an FPN (levels p2-p6, strides 4-64, 256 channels).
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling import SwinTransformer
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

model = get_config("common/models/mask_rcnn_fpn.py").model
constants = get_config("common/data/constants.py").constants
model.pixel_mean = constants.imagenet_rgb256_mean
model.pixel_std = constants.imagenet_rgb256_std
model.input_format = "RGB"
model.backbone.bottom_up = L(SwinTransformer)(
    depths=[2, 2, 18, 2],
    drop_path_rate=0.4,
    embed_dim=128,
    num_heads=[4, 8, 16, 32],
)
model.backbone.in_features = ("p0", "p1", "p2", "p3")
model.backbone.square_pad = 1024
model.backbone.norm = "LN"
model.roi_heads.mask_head.conv_norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]
for key in ("box_head", "box_predictor", "proposal_matcher"):
    model.roi_heads.pop(key)
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
        for th in [0.5, 0.6, 0.7]
    ],
)

# the ViTDet project's LSJ data (RGB, with masks) and trainer settings, as for its ViT-B
_vitdet = LazyConfig.load(os.path.join(os.path.dirname(__file__), "mask_rcnn_vitdet_b_100ep.py"))
dataloader = _vitdet.dataloader
train = _vitdet.train
train.init_checkpoint = (
    "detectron2://ViTDet/COCO/cascade_mask_rcnn_swin_b_in21k/f342979038/model_final_246a82.pkl"
)
train.output_dir = "output/teacher_cascade_mask_rcnn_swin_b_in21k_50ep"
