"""Dense-head regression KD for RetinaNet / FCOS students (``MODEL.MASKD.DENSE_REG_KD``)."""

from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from torch import nn

from ..wrappers import TransparentModule
from .base import HEAD_KD_REGISTRY, HeadKD

__all__ = ["DenseRegressionKD", "RecordingDenseHead", "dense_regression_kd_loss"]

LOSSES = ("l1", "smooth_l1")


class RecordingDenseHead(TransparentModule):
    """Wraps a student's RetinaNet / FCOS head; in training, inside a
    :func:`maskd.modeling.wrappers.recording`, it keeps its outputs as ``"outputs"``."""

    def forward(self, features):
        out = self.inner(features)
        if self.training:
            self.keep(outputs=out)
        return out


def dense_regression_kd_loss(
    student_reg: List[torch.Tensor],
    teacher_reg: List[torch.Tensor],
    levels: List[str],
    kind: str = "l1",
    beta: float = 1.0,
) -> torch.Tensor:
    """L1 or SmoothL1 between dense box-regression outputs, mean over every element.

    Args:
        student_reg, teacher_reg: per level (N, A*4, H, W) (RetinaNet) or (N, 4, H, W) (FCOS).
        levels: the level names, for error messages.
        kind: "l1" or "smooth_l1".
        beta: SmoothL1 beta.
    """
    if kind not in LOSSES:
        raise ValueError(f"MODEL.MASKD.DENSE_REG_KD.LOSS must be 'l1' or 'smooth_l1', got '{kind}'")
    total, count = 0.0, 0
    for name, s, t in zip(levels, student_reg, teacher_reg):
        if s.shape != t.shape:
            raise ValueError(
                f"dense regression KD, level '{name}': student output {tuple(s.shape)} and "
                f"teacher output {tuple(t.shape)} differ (the heads need the same layout)"
            )
        t = t.detach().to(s.dtype)
        if kind == "l1":
            total = total + F.l1_loss(s, t, reduction="sum")
        else:
            total = total + F.smooth_l1_loss(s, t, beta=beta, reduction="sum")
        count += s.numel()
    return total / max(count, 1)


@HEAD_KD_REGISTRY.register()
class DenseRegressionKD(HeadKD):
    """``loss_dense_reg_kd``: the student's dense box-regression outputs are pulled towards the
    teacher's at every location (:func:`dense_regression_kd_loss`); the teacher's head runs on
    its own features, without gradient."""

    CONFIG_KEY = "DENSE_REG_KD"
    LOSS_NAME = "loss_dense_reg_kd"
    SAME_GRID = True  # compares outputs cell by cell: teacher and student must pad alike

    def __init__(self, weight: float = 1.0, loss: str = "l1", beta: float = 1.0):
        """
        Args:
            weight: the loss weight (> 0).
            loss: "l1" or "smooth_l1".
            beta: the SmoothL1 beta.
        """
        super().__init__(weight)
        if loss not in LOSSES:
            raise ValueError(
                f"MODEL.MASKD.DENSE_REG_KD.LOSS must be 'l1' or 'smooth_l1', got '{loss}'"
            )
        self.loss, self.beta = loss, beta

    @classmethod
    def add_config(cls, node: CfgNode) -> None:
        node.WEIGHT = 0.0  # 0 disables
        node.LOSS = "l1"  # "l1" or "smooth_l1"
        node.BETA = 1.0

    @classmethod
    def from_config(cls, node: CfgNode) -> dict:
        return {"weight": node.WEIGHT, "loss": node.LOSS, "beta": node.BETA}

    def check(self, student: nn.Module, teacher: nn.Module) -> None:
        for who, m in (("student", student), ("teacher", teacher)):
            if not hasattr(m, "head") or not hasattr(m, "head_in_features"):
                raise ValueError(
                    "MODEL.MASKD.DENSE_REG_KD needs RetinaNet/FCOS-style models; the "
                    f"{who} is a {type(m).__name__}"
                )
        if list(student.head_in_features) != list(teacher.head_in_features):
            raise ValueError(
                f"MODEL.MASKD.DENSE_REG_KD: the student's head reads {student.head_in_features}, "
                f"the teacher's {teacher.head_in_features}"
            )

    def wrap(self, student: nn.Module) -> None:
        student.head = RecordingDenseHead(student.head)

    def forward(self, student, teacher, teacher_features):
        student_out = student.head.recorded("outputs")
        levels = list(teacher.head_in_features)
        with torch.no_grad():
            teacher_out = teacher.head([teacher_features[lv] for lv in levels])
        return self.weight * dense_regression_kd_loss(
            student_out[1], teacher_out[1], levels, self.loss, self.beta
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, loss={self.loss}, beta={self.beta}"
