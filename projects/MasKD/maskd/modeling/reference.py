"""The plain (literal) formulation of the MasKD losses, written as the published code does it.

For tests (the reference the efficient losses must equal) and benchmarks (what they are timed
against) only: these materialise (N, T, C, H, W) tensors and are never used for training.
"""

from typing import Optional

import torch

__all__ = ["naive_masked_distillation_loss", "naive_dice_diversity_loss", "naive_mask_features"]


def naive_masked_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as :func:`maskd.modeling.losses.masked_distillation_loss`, computed literally."""
    masked_s = student.unsqueeze(1) * masks.unsqueeze(2)  # (N, T, C, H, W)
    masked_t = teacher.unsqueeze(1) * masks.unsqueeze(2)  # (N, T, C, H, W)
    loss = (masked_s - masked_t).pow(2).sum(dim=(3, 4))  # (N, T, C)
    loss = loss / masks.sum(dim=(2, 3)).unsqueeze(2)  # (N, T, C)
    if weights is None:
        return loss.mean()
    return (loss.mean(dim=2) * weights).sum(dim=1).mean()


def naive_dice_diversity_loss(masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same contract as :func:`maskd.modeling.losses.dice_diversity_loss`, with explicit loops."""
    n, t = masks.shape[:2]
    m = masks.reshape(n, t, -1)
    terms = []
    for b in range(n):
        for i in range(t):
            for j in range(t):
                if i != j:
                    inter = (m[b, i] * m[b, j]).sum()
                    den = m[b, i].pow(2).sum() + m[b, j].pow(2).sum() + eps
                    terms.append(2 * inter / den)
    return torch.stack(terms).mean()


def naive_mask_features(
    x: torch.Tensor, masks: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_t w_t * (M_t * x)`` through an (N, T, C, H, W) tensor.

    Args:
        x: (N, C, H, W); masks: (N, T, H, W); weights: (N, T) or None.
    """
    masked = masks.unsqueeze(2) * x.unsqueeze(1)  # (N, T, C, H, W)
    if weights is not None:
        masked = masked * weights[:, :, None, None, None]
    return masked.sum(dim=1)
