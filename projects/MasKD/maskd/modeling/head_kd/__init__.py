"""Head-level distillation terms of stage 2, one file each (see :mod:`.base`), registered with
``@HEAD_KD_REGISTRY.register()``; a term of your own is a module of yours that registers it,
imported with ``--import`` (docs/extending.md).

* :class:`RoIRegressionKD` (``MODEL.MASKD.ROI_REG_KD``, ``loss_roi_reg_kd``): R-CNN students;
  the teacher's box head on the student's sampled proposals, SmoothL1 on box regression.
* :class:`DenseRegressionKD` (``MODEL.MASKD.DENSE_REG_KD``, ``loss_dense_reg_kd``): RetinaNet /
  FCOS students with a teacher of the same head layout; L1 or SmoothL1 at every location.
"""

from .base import HEAD_KD_REGISTRY, HeadKD, add_head_kd_config, build_head_kd
from .dense_regression import DenseRegressionKD, RecordingDenseHead, dense_regression_kd_loss
from .roi_regression import RecordingBoxPredictor, RoIRegressionKD, roi_regression_kd_loss

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
