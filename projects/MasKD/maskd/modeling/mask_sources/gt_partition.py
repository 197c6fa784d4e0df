"""Ground-truth partitions (``gt_partition``, ``gt_instances``): the oracle of what several
weighted masks can add over whole-map mimicking.

The masked feature loss normalises every mask by its own area, ``w_t sum M_t^2 D^2 / sum M_t``,
so masks that split the map into regions make each region count by its weight, not by its
number of cells. These sources split each image by its ground truth, without any learning:

* ``gt_partition``: two masks, the cells of the ground-truth boxes and the rest of the image,
  with weights ``FOREGROUND_WEIGHT`` and ``1 - FOREGROUND_WEIGHT`` (1/2 each by default): the
  objects weigh as much as the background, however few cells they cover.
* ``gt_instances``: one mask per ground-truth box plus the background; the foreground weight is
  shared equally by the boxes, so a small object weighs as much as a large one.

A region without cells at a level (an image without boxes; boxes that cover the whole map at a
coarse level) gives its weight to the others: the weights of an image are renormalised over its
non-empty regions, so an image without boxes is distilled as background only (whole-map
mimicking over its image area).
"""

from typing import Optional

import torch
from detectron2.config import CfgNode

from ...utils.numbers import check_fraction
from .base import MASK_SOURCE_REGISTRY, MaskSource
from .gt_boxes import box_cells, ground_truth_boxes

__all__ = ["GTPartitionMasks", "GTInstanceMasks", "region_weights"]


def region_weights(masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-image region weights renormalised over the regions that have cells.

    Args:
        masks: (N, R, H, W) region masks (0 outside the region).
        weights: (N, R) nominal weights, >= 0.

    Returns:
        (N, R) weights: 0 for an empty region, the others scaled to sum to 1 (an image whose
        regions are all empty keeps all-zero weights).
    """
    present = (masks.flatten(2).sum(dim=2) > 0).to(weights.dtype)  # (N, R)
    w = weights * present
    total = w.sum(dim=1, keepdim=True)  # (N, 1)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), w)


def _area(valid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) cells the loss covers: ``valid``, or every cell of the padded batch."""
    return like.new_ones(like.shape[0], 1, *like.shape[2:]) if valid is None else valid


@MASK_SOURCE_REGISTRY.register()
class GTPartitionMasks(MaskSource):
    """Two masks per image, no learning: 1 on the cells its ground-truth boxes overlap (as
    ``gt_boxes`` marks them) and 1 on the other cells of the loss's area; weights
    ``(foreground_weight, 1 - foreground_weight)``, renormalised over the non-empty regions
    (see the module docstring)."""

    NAME = "gt_partition"
    KEY = "GT_PARTITION"

    def __init__(self, foreground_weight: float = 0.5):
        """
        Args:
            foreground_weight: the weight of the boxes' cells, in [0, 1]; the background has
                the rest.
        """
        super().__init__()
        self.foreground_weight = check_fraction(
            foreground_weight, f"MODEL.MASKD.{self.KEY}.FOREGROUND_WEIGHT"
        )

    @classmethod
    def add_config(cls, maskd_node: CfgNode) -> None:
        setattr(maskd_node, cls.KEY, CfgNode())
        # The loss weight of the ground-truth boxes' cells (mask source "gt_partition"; for
        # "gt_instances", shared by the boxes); the background has the rest.
        getattr(maskd_node, cls.KEY).FOREGROUND_WEIGHT = 0.5

    @classmethod
    def from_config(cls, maskd_node: CfgNode) -> dict:
        return {"foreground_weight": getattr(maskd_node, cls.KEY).FOREGROUND_WEIGHT}

    def extra_repr(self) -> str:
        return f"{self.NAME}, foreground_weight={self.foreground_weight}"

    def forward(self, ctx):
        teacher, stride, valid = ctx.teacher, ctx.stride, ctx.valid
        n, _, h, w = teacher.shape
        boxes = ground_truth_boxes(ctx.batched_inputs, n, self.NAME)
        area = _area(valid, teacher)  # (N, 1, H, W)
        fg = torch.stack([box_cells(b, stride, h, w) for b in boxes])[:, None]
        fg = fg.to(device=teacher.device, dtype=teacher.dtype) * area  # (N, 1, H, W)
        masks = torch.cat([fg, area - fg], dim=1)  # (N, 2, H, W)
        nominal = masks.new_tensor([self.foreground_weight, 1.0 - self.foreground_weight])
        return masks, region_weights(masks, nominal.expand(n, 2))


@MASK_SOURCE_REGISTRY.register()
class GTInstanceMasks(GTPartitionMasks):
    """One mask per ground-truth box (the cells it overlaps) and one for the cells outside
    every box; the boxes share ``foreground_weight`` equally, the background has the rest
    (renormalised over the non-empty regions). Images with fewer boxes than the batch's most
    are padded with empty masks of weight 0, so T = 1 + the largest number of boxes."""

    NAME = "gt_instances"
    KEY = "GT_INSTANCES"

    def forward(self, ctx):
        teacher, stride, valid = ctx.teacher, ctx.stride, ctx.valid
        n, _, h, w = teacher.shape
        boxes = ground_truth_boxes(ctx.batched_inputs, n, self.NAME)
        area = _area(valid, teacher)  # (N, 1, H, W)
        k_max = max([len(b) for b in boxes] + [0])
        masks = teacher.new_zeros(n, k_max + 1, h, w)  # (N, K + 1, H, W): boxes, background
        nominal = teacher.new_zeros(n, k_max + 1)
        for i, b in enumerate(boxes):
            for k, box in enumerate(b):
                masks[i, k] = box_cells(box[None], stride, h, w).to(masks)
            union = masks[i, :k_max].amax(dim=0) if k_max else masks.new_zeros(h, w)
            masks[i, k_max] = 1.0 - union
            if len(b):
                nominal[i, : len(b)] = self.foreground_weight / len(b)
            nominal[i, k_max] = 1.0 - self.foreground_weight
        masks = masks * area
        return masks, region_weights(masks, nominal)
