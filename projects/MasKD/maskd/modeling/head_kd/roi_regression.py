"""RoI box-regression KD for R-CNN students (``MODEL.MASKD.ROI_REG_KD``)."""

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from torch import nn

from ..wrappers import TransparentModule
from .base import HEAD_KD_REGISTRY, HeadKD

__all__ = ["RoIRegressionKD", "RecordingBoxPredictor", "roi_regression_kd_loss"]


class RecordingBoxPredictor(TransparentModule):
    """Wraps a student's ``FastRCNNOutputLayers``; in training, inside a
    :func:`maskd.modeling.wrappers.recording`, it keeps the box deltas of its forward as
    ``"deltas"`` (R, 4 or 4K) and the sampled proposals its losses were computed on as
    ``"proposals"`` (list[Instances])."""

    def forward(self, x):
        predictions = self.inner(x)
        if self.training:
            self.keep(deltas=predictions[1])
        return predictions

    def losses(self, predictions, proposals):
        if self.training:
            self.keep(proposals=proposals)
        return self.inner.losses(predictions, proposals)


def _first(module):
    return module[0] if isinstance(module, nn.ModuleList) else module


def _select_class(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 4K) class-specific deltas -> (R, 4) of the given classes; (R, 4) stays as is."""
    if deltas.shape[1] == 4:
        return deltas
    r = deltas.shape[0]
    return deltas.view(r, -1, 4)[torch.arange(r, device=deltas.device), classes]


def roi_regression_kd_loss(
    teacher: nn.Module,
    teacher_features,
    student_deltas: torch.Tensor,
    proposals,
    beta: float = 1.0,
) -> torch.Tensor:
    """SmoothL1 between the student's and the teacher's RoI box regression (unweighted).

    Args:
        teacher: an R-CNN teacher (StandardROIHeads, or CascadeROIHeads: its first stage).
        teacher_features: dict of the teacher's FPN features (N, C, H, W).
        student_deltas: (R, 4K) or (R, 4) student box-regression outputs on ``proposals``.
        proposals: list[Instances] with ``proposal_boxes`` and ``gt_classes`` (the student's
            sampled proposals, R in all).
        beta: SmoothL1 beta (0: L1).

    Returns:
        scalar: the sum over the four coordinates, mean over the compared proposals. When one
        side regresses per class and the other class-agnostically, the per-class side's deltas of
        each proposal's ground-truth class are used, on foreground proposals only.
    """
    roi = teacher.roi_heads
    with torch.no_grad():
        feats = [teacher_features[f] for f in roi.box_in_features]
        pooled = roi.box_pooler(feats, [p.proposal_boxes for p in proposals])
        _, teacher_deltas = _first(roi.box_predictor)(_first(roi.box_head)(pooled))
    if teacher_deltas.shape == student_deltas.shape:
        s, t = student_deltas, teacher_deltas
    else:
        classes = torch.cat([p.gt_classes for p in proposals])
        k = max(student_deltas.shape[1], teacher_deltas.shape[1]) // 4
        fg = classes < k
        s = _select_class(student_deltas[fg], classes[fg])
        t = _select_class(teacher_deltas[fg], classes[fg])
    loss = F.smooth_l1_loss(s, t.to(s.dtype), beta=beta, reduction="sum")
    return loss / max(s.shape[0], 1)


@HEAD_KD_REGISTRY.register()
class RoIRegressionKD(HeadKD):
    """``loss_roi_reg_kd``: the teacher's box head (first stage of a Cascade teacher) runs on
    the student's sampled proposals, pooled from the teacher's own features; the student's
    box-regression output is pulled towards the teacher's (:func:`roi_regression_kd_loss`)."""

    CONFIG_KEY = "ROI_REG_KD"
    LOSS_NAME = "loss_roi_reg_kd"

    def __init__(self, weight: float = 1.0, beta: float = 1.0):
        """
        Args:
            weight: the loss weight (> 0).
            beta: the SmoothL1 beta (0: L1).
        """
        super().__init__(weight)
        self.beta = beta

    @classmethod
    def add_config(cls, node: CfgNode) -> None:
        node.WEIGHT = 0.0  # 0 disables
        node.BETA = 1.0  # SmoothL1 beta (0: L1)

    @classmethod
    def from_config(cls, node: CfgNode) -> dict:
        return {"weight": node.WEIGHT, "beta": node.BETA}

    def check(self, student: nn.Module, teacher: nn.Module) -> None:
        s_roi, t_roi = getattr(student, "roi_heads", None), getattr(teacher, "roi_heads", None)
        if s_roi is None or isinstance(
            getattr(s_roi, "box_predictor", None), (nn.ModuleList, type(None))
        ):
            raise ValueError(
                "MODEL.MASKD.ROI_REG_KD needs an R-CNN student with StandardROIHeads, "
                f"got {type(student).__name__} / {type(s_roi).__name__}"
            )
        if t_roi is None or not hasattr(t_roi, "box_pooler"):
            raise ValueError(
                f"MODEL.MASKD.ROI_REG_KD needs an R-CNN teacher, got {type(teacher).__name__}"
            )
        s_classes, t_classes = getattr(s_roi, "num_classes", None), getattr(
            t_roi, "num_classes", None
        )
        if s_classes != t_classes:
            raise ValueError(
                f"MODEL.MASKD.ROI_REG_KD compares box regression per class, but the student has "
                f"{s_classes} classes (MODEL.ROI_HEADS.NUM_CLASSES) and the teacher {t_classes}: "
                "the teacher must be trained for the student's classes"
            )

    def wrap(self, student: nn.Module) -> None:
        student.roi_heads.box_predictor = RecordingBoxPredictor(student.roi_heads.box_predictor)

    def forward(self, student, teacher, teacher_features):
        predictor = student.roi_heads.box_predictor
        deltas, proposals = predictor.recorded("deltas"), predictor.recorded("proposals")
        return self.weight * roi_regression_kd_loss(
            teacher, teacher_features, deltas, proposals, self.beta
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, beta={self.beta}"
