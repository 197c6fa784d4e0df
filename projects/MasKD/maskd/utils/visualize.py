"""Draw the receptive masks of learned tokens over images, like the paper's mask figure."""

import contextlib
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.backbone import TokenMaskedBackbone, unwrap_backbone
from ..modeling.diagnostics import foreground_cells, level_sizes, token_statistics
from ..modeling.logits import LOGITS, point_shapes, teacher_logits
from ..modeling.pairing import teacher_batch
from ..modeling.teacher import preprocess_images
from .files import atomic_write

__all__ = ["receptive_masks", "mask_grid", "save_mask_grid", "format_statistics"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def receptive_masks(model, batched_input: dict, with_statistics: bool = False):
    """The masks of every distilled level for one image, resized to the input image.

    Args:
        model: a ``MasKDTokenLearner`` or ``MasKD`` model (its ``tokens`` and ``teacher``).
        batched_input: one dict as detectron2's DatasetMapper makes it ("image": (3, H, W);
            with "instances", the ground-truth boxes give the statistics their ``gt_share``).
        with_statistics: also return the token statistics of every level
            (:func:`maskd.modeling.diagnostics.token_statistics`, at the level's resolution, without
            padding), the numbers the training logs show.

    Returns:
        level -> (T, H, W) masks in [0, 1] on the CPU, cropped to the image (no padding);
        with ``with_statistics``, a pair (masks, level -> {statistic: float}).
    """
    teacher = model.teacher
    # the teacher's channel order (MasKD models convert for a teacher that reads the other one)
    inputs = teacher_batch([batched_input], model.input_format, model.teacher_format)
    images = preprocess_images(teacher, inputs)
    backbone = unwrap_backbone(teacher.backbone)
    # stage 1's model: its gate decides what the teacher sees (the "combined" statistic)
    gated = teacher.backbone if isinstance(teacher.backbone, TokenMaskedBackbone) else None
    features = backbone(images.tensor)
    with_logits = LOGITS in model.tokens
    if with_logits:  # the head's plain logits (stage 1's masking off)
        plain = getattr(model, "masks_disabled", contextlib.nullcontext)
        with plain():
            features[LOGITS] = teacher_logits(teacher, features)
    strides = {lv: shape.stride for lv, shape in point_shapes(teacher, with_logits).items()}
    h, w = images.image_sizes[0]
    padded = tuple(images.tensor.shape[-2:])
    out, stats = {}, {}
    for level, rt in model.tokens.items():
        feat = features[level]
        masks = rt.masks(feat)  # (1, T, h_l, w_l)
        if with_statistics:
            weights = rt.weights(feat) if rt.weighted else None  # (1, T)
            sizes = level_sizes(images.image_sizes, padded, masks.shape[-2:])
            fg = foreground_cells(inputs, strides[level], *masks.shape[-2:])
            view = None if gated is None else gated.teacher_view(masks, weights)
            stats[level] = {
                k: v.item()
                for k, v in token_statistics(
                    masks, weights, sizes, foreground=fg, combined=view
                ).items()
            }
        masks = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)
        out[level] = masks[0, :, :h, :w].float().cpu()
    return (out, stats) if with_statistics else out


_SHORT = {
    "coverage": "cover",
    "constant": "const",
    "dice": "dice",
    "weight_entropy": "H(w)",
    "combined": "comb",
    "tokens_eff": "T_eff",
    "weighted_dice": "dice_w",
    "gt_share": "gt",
    "gt_share_uniform": "gt_unif",
}


def format_statistics(stats: Dict[str, float]) -> str:
    """One level's token statistics in short lines (three numbers each), for a figure label."""
    parts = [f"{_SHORT.get(k, k)} {v:.2f}" for k, v in stats.items()]
    return "\n".join(" ".join(parts[i : i + 3]) for i in range(0, len(parts), 3))


def mask_grid(
    image_rgb: np.ndarray,
    masks: Dict[str, torch.Tensor],
    alpha: float = 0.6,
    statistics: Optional[Dict[str, Dict[str, float]]] = None,
):
    """A matplotlib figure: one row per level, the image then one overlay per token.

    Args:
        image_rgb: (H, W, 3) uint8 image, at the masks' resolution.
        masks: level -> (T, H, W) masks in [0, 1].
        alpha: opacity of the mask overlay.
        statistics: level -> token statistics, written under the level's image
            (coverage, near-constant share, Dice overlap, token-weight entropy).

    Returns:
        matplotlib Figure (save it with ``fig.savefig(path)``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels: List[str] = list(masks)
    num_tokens = max(m.shape[0] for m in masks.values())
    fig, axes = plt.subplots(
        len(levels),
        num_tokens + 1,
        figsize=(2 * (num_tokens + 1), 2 * len(levels)),
        squeeze=False,
    )
    for row, level in enumerate(levels):
        axes[row, 0].imshow(image_rgb)
        axes[row, 0].set_ylabel(level)
        if statistics and level in statistics:
            axes[row, 0].set_xlabel(format_statistics(statistics[level]), fontsize=7)
        for t in range(num_tokens):
            ax = axes[row, t + 1]
            ax.imshow(image_rgb)
            if t < masks[level].shape[0]:
                ax.imshow(masks[level][t].numpy(), cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
            if row == 0:
                ax.set_title(f"token {t}")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_mask_grid(
    model, batched_input: dict, path: str, input_format: Optional[str] = "BGR"
) -> Dict[str, torch.Tensor]:
    """Compute the masks of one image and write their grid to ``path`` (PNG), each level's
    row labelled with its token statistics.

    Returns:
        (level -> (T, H, W) masks, level -> token statistics of this image).
    """
    masks, stats = receptive_masks(model, batched_input, with_statistics=True)
    image = batched_input["image"].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    if input_format == "BGR":
        image = image[:, :, ::-1]
    fig = mask_grid(np.ascontiguousarray(image), masks, statistics=stats)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), overwrite=True)
    import matplotlib.pyplot as plt

    plt.close(fig)
    logger.info("Wrote %s", path)
    return masks, stats
