"""Inheriting: the student's neck and heads start from the teacher's weights where names and
shapes match (the paper's detection configs use it with RoI box-regression KD)."""

import logging
from typing import List, Tuple

from torch import nn

__all__ = ["inherit_neck_and_heads"]

logger = logging.getLogger(__name__)


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
