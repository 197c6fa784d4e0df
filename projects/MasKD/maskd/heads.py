"""Head-level distillation and "inheriting", the extras behind the paper's detection numbers.

* RoI box-regression KD (R-CNN students): the teacher's box head runs on the student's sampled
  proposals, pooled from the teacher's own features, and the student's box-regression output is
  pulled towards the teacher's with SmoothL1.
* Dense-head regression KD (RetinaNet / FCOS students with a teacher of the same head layout):
  L1 or SmoothL1 between the box-regression outputs at every location.
* Inheriting: the student's neck and heads start from the teacher's weights where names and
  shapes match.

The student's outputs are taken with recording wrappers (plain forwards, transparent in state
dicts), never with hooks.
"""

import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import TransparentWrapper

__all__ = [
    "RecordingBoxPredictor",
    "RecordingDenseHead",
    "roi_regression_kd_loss",
    "dense_regression_kd_loss",
    "inherit_neck_and_heads",
]

logger = logging.getLogger(__name__)


class RecordingBoxPredictor(TransparentWrapper, nn.Module):
    """Wraps a student's ``FastRCNNOutputLayers``; in training it keeps the predictions of the
    last forward and the sampled proposals its losses were computed on."""

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)
        self._wrap(inner)
        self.recorded = None

    def forward(self, x):
        predictions = self.inner(x)
        if self.training:
            self.recorded = {"predictions": predictions}
        return predictions

    def losses(self, predictions, proposals):
        if self.training and self.recorded is not None:
            self.recorded["proposals"] = proposals
        return self.inner.losses(predictions, proposals)

    def pop(self):
        """Returns (proposal_deltas (R, 4 or 4K), proposals list[Instances]) and clears them."""
        rec, self.recorded = self.recorded, None
        if rec is None or "proposals" not in rec:
            raise RuntimeError("the student's ROI heads did not compute box losses this step")
        return rec["predictions"][1], rec["proposals"]


class RecordingDenseHead(TransparentWrapper, nn.Module):
    """Wraps a student's RetinaNet / FCOS head; in training it keeps its last outputs."""

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)
        self._wrap(inner)
        self.recorded = None

    def forward(self, features):
        out = self.inner(features)
        self.recorded = out if self.training else None
        return out

    def pop(self):
        """Returns the head outputs of the last training forward and clears them."""
        out, self.recorded = self.recorded, None
        if out is None:
            raise RuntimeError("the student's dense head did not run in training mode")
        return out


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
    """SmoothL1 between the student's and the teacher's RoI box regression.

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
    if kind not in ("l1", "smooth_l1"):
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


def inherit_neck_and_heads(student: nn.Module, teacher: nn.Module) -> Tuple[List[str], List[str]]:
    """Copy the teacher's neck (FPN) and head weights into the student where names and shapes
    match. The bottom-up backbone (``backbone.bottom_up``) and pixel statistics are not copied.

    Returns:
        (copied keys, student neck/head keys not copied).
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied, skipped = [], []
    update = {}
    for key, value in s_state.items():
        if key.startswith("backbone.bottom_up.") or key in ("pixel_mean", "pixel_std"):
            continue
        if key in t_state and t_state[key].shape == value.shape:
            update[key] = t_state[key].detach().clone()
            copied.append(key)
        else:
            skipped.append(key)
    student.load_state_dict(update, strict=False)
    logger.info("Inheriting: copied %d tensors of the teacher's neck and heads", len(copied))
    if skipped:
        logger.info("Inheriting: not copied (no match in name or shape): %s", skipped)
    return copied, skipped
