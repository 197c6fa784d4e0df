"""The ground-truth box prior (``gt_boxes``): foreground cells of each level, as box-prior
feature distillation (DeFeat, FGD) uses them."""

import math
from typing import List

import torch
from detectron2.config import CfgNode

from ...utils.numbers import check_fraction
from .base import MASK_SOURCE_REGISTRY, MaskSource

__all__ = ["GTBoxMasks", "box_cells", "ground_truth_boxes"]


def box_cells(boxes: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """The cells of a level that the boxes cover.

    Cell (i, j) covers the pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``; a box ``(x0, y0, x1, y1)``
    covers the cells whose pixel square it overlaps with positive area, i.e. rows
    ``floor(y0 / s) .. ceil(y1 / s) - 1`` and columns likewise (clipped to the map).

    Args:
        boxes: (K, 4) boxes (x0, y0, x1, y1) in pixels; K may be 0.
        stride: s.
        height, width: the level's grid.

    Returns:
        (height, width) float 0/1 map.
    """
    out = torch.zeros(height, width, dtype=torch.float32, device=boxes.device)
    for x0, y0, x1, y1 in boxes.tolist():
        if not (x1 > x0 and y1 > y0):
            continue  # an empty box covers nothing
        r0, r1 = max(0, math.floor(y0 / stride)), min(height, math.ceil(y1 / stride))
        c0, c1 = max(0, math.floor(x0 / stride)), min(width, math.ceil(x1 / stride))
        out[r0:r1, c0:c1] = 1.0
    return out


def ground_truth_boxes(batched_inputs: List[dict], n: int, name: str) -> List[torch.Tensor]:
    """The ground-truth boxes of each image of a batch of ``n``: N (K_i, 4) tensors (x0, y0, x1,
    y1) in pixels.

    Raises:
        ValueError: the inputs are not ``n``, or an input has no ``instances`` (naming the mask
            source ``name`` that needs them).
    """
    if len(batched_inputs) != n:
        raise ValueError(f"{len(batched_inputs)} inputs for a batch of {n} feature maps")
    boxes = []
    for x in batched_inputs:
        if "instances" not in x:
            raise ValueError(
                f"mask source '{name}' needs the ground truth: the training inputs have no "
                "'instances'"
            )
        boxes.append(x["instances"].gt_boxes.tensor)
    return boxes


@MASK_SOURCE_REGISTRY.register()
class GTBoxMasks(MaskSource):
    """One mask per image: 1 on the cells of its ground-truth boxes, ``background`` on the
    other cells of the image area (0 outside it), no weights. An image without boxes has only
    background (with ``background`` 0 it adds nothing to the loss)."""

    NAME = "gt_boxes"

    def __init__(self, background: float = 0.0):
        """
        Args:
            background: the mask value of cells outside every box, in [0, 1].
        """
        super().__init__()
        check_fraction(background, "MODEL.MASKD.GT_BOXES.BACKGROUND")
        self.background = background

    @classmethod
    def add_config(cls, maskd_node: CfgNode) -> None:
        maskd_node.GT_BOXES = CfgNode()
        # The mask value of cells outside the boxes (mask source "gt_boxes").
        maskd_node.GT_BOXES.BACKGROUND = 0.0

    @classmethod
    def from_config(cls, maskd_node: CfgNode) -> dict:
        return {"background": maskd_node.GT_BOXES.BACKGROUND}

    def extra_repr(self) -> str:
        return f"{self.NAME}, background={self.background}"

    def forward(self, ctx):
        teacher, stride, valid = ctx.teacher, ctx.stride, ctx.valid
        n, _, h, w = teacher.shape
        boxes = ground_truth_boxes(ctx.batched_inputs, n, self.NAME)
        fg = torch.stack([box_cells(b, stride, h, w) for b in boxes])[:, None].to(
            device=teacher.device, dtype=teacher.dtype
        )
        masks = fg + self.background * (1.0 - fg)  # (N, 1, H, W)
        if valid is None:  # the padded batch: the padding is background too
            return masks, None
        return masks * valid, None
