"""Head-level distillation terms of stage 2, one file each (see :mod:`.base`); a file added
here is imported with the package, so its ``@HEAD_KD_REGISTRY.register()`` is all it takes.

* :class:`RoIRegressionKD` (``MODEL.MASKD.ROI_REG_KD``, ``loss_roi_reg_kd``): R-CNN students;
  the teacher's box head on the student's sampled proposals, SmoothL1 on box regression.
* :class:`DenseRegressionKD` (``MODEL.MASKD.DENSE_REG_KD``, ``loss_dense_reg_kd``): RetinaNet /
  FCOS students with a teacher of the same head layout; L1 or SmoothL1 at every location.
"""

import importlib
import pkgutil

from .base import HEAD_KD_REGISTRY, HeadKD, add_head_kd_config, build_head_kd
from .dense_regression import DenseRegressionKD, RecordingDenseHead, dense_regression_kd_loss
from .roi_regression import RecordingBoxPredictor, RoIRegressionKD, roi_regression_kd_loss

# Every module of this folder is imported, so a new term's file registers it: nothing else to
# edit.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f".{_module.name}", __name__)

__all__ = [
    "HEAD_KD_REGISTRY",
    "HeadKD",
    "add_head_kd_config",
    "build_head_kd",
    "RoIRegressionKD",
    "DenseRegressionKD",
    "RecordingBoxPredictor",
    "RecordingDenseHead",
    "roi_regression_kd_loss",
    "dense_regression_kd_loss",
]
