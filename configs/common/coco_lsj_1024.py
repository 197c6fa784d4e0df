"""COCO with large-scale jitter at 1024 px: the training data of detectron2's ViTDet project (and,
padded, of its LSJ "new baselines").

Training: horizontal flip, ResizeScale 0.1-2.0 of a 1024 x 1024 target, a 1024 x 1024 crop
without padding (the model pads: ViTDet and Swin to a 1024 square). Every image is therefore at
most 1024 px on each side, which a teacher that pads to a 1024 square needs. Evaluation:
ResizeShortestEdge to 1024, at most 1024. The channel order is detectron2's default (BGR); a
config that uses this sets ``dataloader.train.mapper.image_format`` to what its model reads.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

IMAGE_SIZE = 1024

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=IMAGE_SIZE, target_width=IMAGE_SIZE
    ),
    L(T.FixedSizeCrop)(crop_size=(IMAGE_SIZE, IMAGE_SIZE), pad=False),
]
dataloader.train.mapper.recompute_boxes = True  # boxes from the cropped masks
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE),
]
