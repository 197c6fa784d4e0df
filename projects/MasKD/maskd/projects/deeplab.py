"""DeepLabV3 / V3+ teachers and students (detectron2's DeepLab project, ``detectron2.projects.
deeplab``, shipped in detectron2's package): their config keys, data augmentation, learning-rate
schedule and the Cityscapes evaluator, the way the project's own ``train_net.py`` sets them up.

Importing this module registers the project's backbone (``build_resnet_deeplab_backbone``) and
heads (``DeepLabV3Head``, ``DeepLabV3PlusHead``) with detectron2.
"""

import logging
from typing import List

import detectron2.data.transforms as T
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.projects.deeplab import add_deeplab_config as _add_deeplab_config
from detectron2.projects.deeplab import build_lr_scheduler as _deeplab_lr_scheduler

__all__ = [
    "DEEPLAB_HEADS",
    "add_deeplab_config",
    "is_deeplab",
    "semantic_train_augmentations",
    "build_deeplab_train_loader",
    "build_lr_scheduler",
]

logger = logging.getLogger(__name__)

DEEPLAB_HEADS = ("DeepLabV3Head", "DeepLabV3PlusHead")


def add_deeplab_config(cfg: CfgNode) -> CfgNode:
    """The DeepLab project's keys (``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``, ``SOLVER.POLY_LR_*``,
    ``MODEL.SEM_SEG_HEAD.{LOSS_TYPE, PROJECT_*, ASPP_*}``, ``MODEL.RESNETS.{RES4_DILATION,
    RES5_MULTI_GRID, STEM_TYPE}``), added once; other models do not read them."""
    if "STEM_TYPE" not in cfg.MODEL.RESNETS:
        _add_deeplab_config(cfg)
    return cfg


def is_deeplab(cfg: CfgNode) -> bool:
    """Whether a yacs config's model (the student's ``MODEL.*`` in a MasKD config) is DeepLab."""
    return cfg.MODEL.SEM_SEG_HEAD.NAME in DEEPLAB_HEADS


def semantic_train_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """The DeepLab project's training augmentation: resize the shortest edge (``INPUT.MIN_SIZE_
    TRAIN`` etc.), then a random crop (``INPUT.CROP``) in which no class covers more than
    ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of the labelled pixels, then a horizontal flip.
    (detectron2's default mapper would crop before resizing.)

    The steps of ``build_sem_seg_train_aug`` in the project's ``projects/DeepLab/train_net.py``
    (v0.7.2), a script outside detectron2's package that cannot be imported."""
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    augs.append(T.RandomFlip())
    return augs


def build_deeplab_train_loader(cfg: CfgNode):
    """detectron2's train loader with :func:`semantic_train_augmentations`."""
    mapper = DatasetMapper(cfg, is_train=True, augmentations=semantic_train_augmentations(cfg))
    return build_detection_train_loader(cfg, mapper=mapper)


def build_lr_scheduler(cfg: CfgNode, optimizer):
    """detectron2's schedulers plus the DeepLab project's ``WarmupPolyLR``."""
    return _deeplab_lr_scheduler(cfg, optimizer)
