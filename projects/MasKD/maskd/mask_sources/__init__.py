"""Mask sources of the masked feature loss, one file each (see :mod:`.base`); a file added here
is imported with the package, so its ``@MASK_SOURCE_REGISTRY.register()`` is all it takes.

* ``tokens`` (:class:`TokenMasks`): the learned receptive tokens (the paper; default).
* ``uniform`` (:class:`UniformMasks`): every cell weight 1: whole-map mimicking.
* ``gt_boxes`` (:class:`GTBoxMasks`): the ground-truth boxes' cells, background weighted by
  ``MODEL.MASKD.GT_BOXES.BACKGROUND``.
* ``random_tokens`` (:class:`RandomTokenMasks`): untrained tokens.
"""

import importlib
import pkgutil

from .base import (
    MASK_SOURCE_REGISTRY,
    MaskSource,
    add_mask_source_config,
    build_mask_source,
    mask_source_class,
)
from .gt_boxes import GTBoxMasks, box_cells
from .random_tokens import RandomTokenMasks
from .tokens import TokenMasks
from .uniform import UniformMasks

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f".{_module.name}", __name__)

__all__ = [
    "MASK_SOURCE_REGISTRY",
    "MaskSource",
    "add_mask_source_config",
    "build_mask_source",
    "mask_source_class",
    "TokenMasks",
    "UniformMasks",
    "GTBoxMasks",
    "RandomTokenMasks",
    "box_cells",
]
