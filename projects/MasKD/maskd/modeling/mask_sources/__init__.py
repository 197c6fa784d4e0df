"""Mask sources of the masked feature loss, one file each (see :mod:`.base`), registered with
``@MASK_SOURCE_REGISTRY.register()``; a source of your own is a module of yours that registers
it, imported with ``--import`` (docs/extending.md).

* ``tokens`` (:class:`TokenMasks`): the learned receptive tokens (the paper; default).
* ``uniform`` (:class:`UniformMasks`): every cell weight 1: whole-map mimicking.
* ``gt_boxes`` (:class:`GTBoxMasks`): the ground-truth boxes' cells, background weighted by
  ``MODEL.MASKD.GT_BOXES.BACKGROUND``.
* ``random_tokens`` (:class:`RandomTokenMasks`): untrained tokens.
* ``gt_partition`` (:class:`GTPartitionMasks`): the oracle partition, ground-truth boxes and
  background as two masks of weight 1/2 each (``MODEL.MASKD.GT_PARTITION.FOREGROUND_WEIGHT``).
* ``gt_instances`` (:class:`GTInstanceMasks`): one mask per ground-truth box plus the
  background (``MODEL.MASKD.GT_INSTANCES.FOREGROUND_WEIGHT``).
"""

from .base import (
    MASK_SOURCE_REGISTRY,
    LevelContext,
    MaskSource,
    add_mask_source_config,
    build_mask_source,
    mask_source_class,
)
from .gt_boxes import GTBoxMasks, box_cells
from .gt_partition import GTInstanceMasks, GTPartitionMasks, region_weights
from .random_tokens import RandomTokenMasks
from .tokens import TokenMasks
from .uniform import UniformMasks

__all__ = [
    "MASK_SOURCE_REGISTRY",
    "LevelContext",
    "MaskSource",
    "add_mask_source_config",
    "build_mask_source",
    "mask_source_class",
    "TokenMasks",
    "UniformMasks",
    "GTBoxMasks",
    "RandomTokenMasks",
    "GTPartitionMasks",
    "GTInstanceMasks",
    "box_cells",
    "region_weights",
]
