"""The MasKD losses as pure functions: masked distillation and Dice diversity.

Both are computed in float32 (float64 for float64 inputs), also under autocast, and neither
materialises an (N, T, C, H, W) tensor.
"""

import math
from typing import Dict, Optional

import torch

__all__ = [
    "masked_distillation_loss",
    "dice_diversity_loss",
    "min_token_area_loss",
    "combined_mask",
    "union_mask",
    "masked_aggregate",
    "saliency_cell_loss",
    "neutral_fill",
    "FILLS",
    "raise_if_not_finite",
]

# What a cell switched off by the masks of stage 1 becomes (see :func:`neutral_fill`).
FILLS = ("zeros", "mean", "blur")
BLUR_KERNEL = 5


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _ChannelMeanSquaredDiff(torch.autograd.Function):
    """``mean_c (a - b)^2`` of (N, C, HW) inputs -> (N, HW), with an analytic backward.

    Saves only references to its inputs: the difference is recomputed in backward rather than
    kept alive between the passes, so the loss holds no feature-sized buffer of its own.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a - b).square_().mean(dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        scale = grad_out.unsqueeze(1) * (2.0 / a.shape[1])  # (N, 1, HW)
        grad_a = (a - b).mul_(scale)
        grad_b = -grad_a if ctx.needs_input_grad[1] else None
        return (grad_a if ctx.needs_input_grad[0] else None), grad_b


def masked_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Masked feature distillation loss of one feature level.

    With ``D = student - teacher`` the per-token, per-channel loss is

        L[n, t, c] = sum_hw M[n, t, hw]^2 * D[n, c, hw]^2 / sum_hw M[n, t, hw]

    (the mask multiplies both features, so it enters squared). The result is
    ``mean_n(sum_t weights[n, t] * mean_c L[n, t, c])`` or, without weights, the mean of L over
    n, t and c. Since only ``mean_c L`` is needed and L is linear in ``D^2``,
    ``mean_c L[n, t] = sum_hw M[n, t, hw]^2 * mean_c D^2[n, hw] / sum_hw M[n, t, hw]``:
    one (N, HW) reduction of the squared difference and an (N, T, HW) product, never an
    (N, T, C, H, W) tensor.

    Args:
        student: (N, C, H, W) student features (already aligned to the teacher's channels).
        teacher: (N, C, H, W) teacher features.
        masks: (N, T, H, W) soft masks in [0, 1].
        weights: (N, T) per-image token weights, or None.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs). Zero, but still connected to
        the inputs' autograd graph, when N == 0.
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(
            f"student and teacher features must have the same (N, C, H, W) shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    n, c, h, w = student.shape
    if masks.dim() != 4 or masks.shape[0] != n or masks.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"masks must have shape (N, T, H, W) = ({n}, T, {h}, {w}), got {tuple(masks.shape)}"
        )
    t = masks.shape[1]
    if weights is not None and weights.shape != (n, t):
        raise ValueError(f"weights must have shape (N, T) = ({n}, {t}), got {tuple(weights.shape)}")

    dtype = _compute_dtype(student, teacher, masks)
    with torch.autocast(device_type=student.device.type, enabled=False):
        sq = _ChannelMeanSquaredDiff.apply(
            student.to(dtype).reshape(n, c, h * w), teacher.to(dtype).reshape(n, c, h * w)
        ).unsqueeze(
            1
        )  # (N, 1, HW): mean_c D^2
        m = masks.to(dtype).reshape(n, t, h * w)  # (N, T, HW)
        numer = (m.square() * sq).sum(dim=2)  # (N, T)
        denom = m.sum(dim=2).clamp_min(torch.finfo(dtype).tiny)  # (N, T)
        per_token = numer / denom  # (N, T): mean_c L[n, t, c]
        if weights is not None:
            return (per_token * weights.to(dtype)).sum() / max(n, 1)
        return per_token.sum() / max(n * t, 1)


def dice_diversity_loss(
    masks: torch.Tensor, eps: float = 1e-6, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dice similarity between the masks of different tokens, to keep the masks diverse.

    For one image with masks flattened to ``m_t`` (HW,), ``dice(i, j) = 2 <m_i, m_j> /
    (|m_i|^2 + |m_j|^2 + eps)``; the loss is the mean over images and ordered pairs i != j,
    computed from the (N, T, T) Gram matrix. With ``weights`` (opt-in, not the paper's), each
    image's pairs are weighted by ``w_i w_j`` instead: ``sum_{i != j} w_i w_j dice(i, j) /
    sum_{i != j} w_i w_j``, so that the tokens carrying the weight are the ones kept apart (an
    image without a weighted pair adds 0); the weights get no gradient from it.

    Args:
        masks: (N, T, H, W) soft masks.
        eps: added to the denominator.
        weights: (N, T) token weights, or None (every pair counts alike: the paper).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs). With a single token (T = 1)
        there is no pair, and the loss is 0 by definition; it is 0 too for N == 0. In both
        cases it stays connected to the autograd graph of ``masks``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, T, H, W), got {tuple(masks.shape)}")
    n, t = masks.shape[:2]
    if weights is not None and weights.shape != (n, t):
        raise ValueError(f"weights must have shape (N, T) = ({n}, {t}), got {tuple(weights.shape)}")
    dtype = _compute_dtype(masks)
    with torch.autocast(device_type=masks.device.type, enabled=False):
        m = masks.to(dtype).flatten(2)  # (N, T, HW)
        if n == 0 or t < 2:
            return m.sum() * 0.0
        gram = torch.bmm(m, m.transpose(1, 2))  # (N, T, T)
        sq_norm = torch.diagonal(gram, dim1=1, dim2=2)  # (N, T)
        dice = 2.0 * gram / (sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) + eps)  # (N, T, T)
        off_diag = ~torch.eye(t, dtype=torch.bool, device=masks.device)
        if weights is None:
            return dice[:, off_diag].sum() / (n * t * (t - 1))
        w = weights.detach().to(dtype)
        pair = (w.unsqueeze(2) * w.unsqueeze(1))[:, off_diag]  # (N, T(T-1))
        total = pair.sum(dim=1)  # (N,)
        per_image = (pair * dice[:, off_diag]).sum(dim=1) / total.clamp_min(torch.finfo(dtype).tiny)
        return per_image.sum() / n


def min_token_area_loss(masks: torch.Tensor, min_area: float) -> torch.Tensor:
    """How far the tokens fall short of a minimum area (opt-in, not the paper's):
    ``mean over images and tokens of relu(a - mean_hw M_t) / a``, so a token switched off
    everywhere costs 1 and a token covering at least ``a`` of the map costs nothing.

    Args:
        masks: (N, T, H, W) soft masks.
        min_area: a in (0, 1].

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); 0, connected to the graph of
        ``masks``, for N == 0.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, T, H, W), got {tuple(masks.shape)}")
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"MODEL.MASKD.MIN_TOKEN_AREA must lie in (0, 1], got {min_area}")
    dtype = _compute_dtype(masks)
    with torch.autocast(device_type=masks.device.type, enabled=False):
        m = masks.to(dtype)
        if m.numel() == 0:
            return m.sum() * 0.0
        area = m.mean(dim=(2, 3))  # (N, T)
        return ((min_area - area).clamp_min(0.0) / min_area).mean()


def neutral_fill(features: torch.Tensor, kind: str) -> Optional[torch.Tensor]:
    """What a masked-out cell of stage 1 becomes (opt-in, not the paper's), from the frozen
    teacher features: None for "zeros" (the paper: the cell is multiplied by its mask), the
    level's per-image channel mean for "mean", a 5x5 box blur of the level for "blur" (the
    remedy of perturbation-based saliency: a switched-off cell looks like its surroundings
    rather than like nothing the teacher's heads have seen).

    Args:
        features: (N, C, H, W) features.
        kind: one of :data:`FILLS`.

    Returns:
        None, (N, C, 1, 1) or (N, C, H, W), without gradient.
    """
    if kind not in FILLS:
        raise ValueError(f"MODEL.MASKD.FILL must be one of {FILLS}, got '{kind}'")
    if kind == "zeros":
        return None
    with torch.no_grad():
        if kind == "mean":
            return features.mean(dim=(2, 3), keepdim=True)
        return torch.nn.functional.avg_pool2d(
            features, BLUR_KERNEL, stride=1, padding=BLUR_KERNEL // 2, count_include_pad=False
        )


def combined_mask(masks: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The combined mask ``sum_t w_t M_t`` (unweighted: ``sum_t M_t``).

    Args:
        masks: (N, T, H, W) soft masks.
        weights: (N, T) token weights, or None.

    Returns:
        (N, H, W) tensor in the dtype of ``masks``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, T, H, W), got {tuple(masks.shape)}")
    if weights is not None:
        return torch.einsum("nthw,nt->nhw", masks, weights.to(masks.dtype))
    return masks.sum(dim=1)


def union_mask(masks: torch.Tensor) -> torch.Tensor:
    """The soft union of the masks, ``1 - prod_t (1 - M_t)``: a cell counts as seen as soon as
    one token covers it, whatever the tokens' weights.

    Args:
        masks: (N, T, H, W) soft masks in [0, 1].

    Returns:
        (N, H, W) tensor in [0, 1], in the dtype of ``masks``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, T, H, W), got {tuple(masks.shape)}")
    return 1.0 - torch.prod(1.0 - masks, dim=1)


def saliency_cell_loss(
    masks: torch.Tensor, weights: torch.Tensor, saliency: torch.Tensor
) -> torch.Tensor:
    """``KL(s^ || q^)``: how far stage 2's loss over the cells is from the teacher's saliency.

    ``q = sum_t w_t M_t^2 / sum_hw M_t`` is the weight stage 2's masked loss gives each cell,
    ``q^ = q / sum_hw q`` and ``s^ = s / sum_hw s`` the two as distributions over the cells;
    averaged over the images with saliency (0 when none has any). With hard, disjoint masks it
    is lowest where each token's weight is its region's share of the saliency: the tokens
    carve the map into regions of like saliency per cell, and the weights rank them by it.

    Args:
        masks: (N, T, H, W) soft masks, with gradient.
        weights: (N, T) token weights, with gradient.
        saliency: (N, H, W) non-negative saliency, without gradient.

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs).
    """
    n, t = masks.shape[:2]
    if weights.shape != (n, t) or saliency.shape != (n, *masks.shape[2:]):
        raise ValueError(
            f"masks (N, T, H, W), weights (N, T) and saliency (N, H, W) do not fit: "
            f"{tuple(masks.shape)}, {tuple(weights.shape)}, {tuple(saliency.shape)}"
        )
    dtype = _compute_dtype(masks, weights, saliency)
    with torch.autocast(device_type=masks.device.type, enabled=False):
        tiny = torch.finfo(dtype).tiny
        m = masks.to(dtype).flatten(2)  # (N, T, HW)
        per_token = weights.to(dtype) / m.sum(dim=2).clamp_min(tiny)  # (N, T)
        q = torch.einsum("nt,ntp->np", per_token, m.square())  # (N, HW)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)
        s = saliency.detach().to(dtype).flatten(1)  # (N, HW)
        total = s.sum(dim=1, keepdim=True)
        has = total[:, 0] > 0
        if not bool(has.any()):
            return (q * 0.0).sum()
        p = s / total.clamp_min(tiny)
        kl = torch.where(p > 0, p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log()), 0.0)
        return kl.sum(dim=1)[has].mean()


def masked_aggregate(
    features: torch.Tensor,
    masks: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    combined: Optional[torch.Tensor] = None,
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The masked aggregate of stage 1, ``sum_t w_t * (M_t * x)``.

    Computed as ``x * c`` with ``c = sum_t w_t M_t``: no (N, T, C, H, W) intermediate. With a
    ``fill`` (:func:`neutral_fill`), ``x * c + fill * (1 - c)``: what the masks take away is
    replaced by the fill instead of zeros.

    Args:
        features: (N, C, H, W) features x.
        masks: (N, T, H, W) soft masks.
        weights: (N, T) token weights, or None for the plain sum over tokens.
        combined: :func:`combined_mask` of ``masks`` and ``weights`` if already computed.
        fill: None (zeros: the paper), or a tensor broadcastable to (N, C, H, W).

    Returns:
        (N, C, H, W) tensor in the dtype of ``features``.
    """
    if (
        masks.dim() != 4
        or masks.shape[0] != features.shape[0]
        or masks.shape[2:] != features.shape[2:]
    ):
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not fit features of shape "
            f"{tuple(features.shape)}: expected (N, T, H, W) with the features' N, H, W"
        )
    if combined is None:
        combined = combined_mask(masks, weights)
    c = combined.unsqueeze(1).to(features.dtype)  # (N, 1, H, W)
    if fill is None:
        return features * c  # (N, C, H, W)
    return features * c + fill.to(features.dtype) * (1.0 - c)


def raise_if_not_finite(losses: Dict[str, torch.Tensor], source: str, iteration: int) -> None:
    """Raise a FloatingPointError naming the non-finite terms of ``losses`` and their source.

    Args:
        losses: name -> scalar tensor.
        source: what produced them, e.g. "the student's task losses" or "loss_maskd per level".
        iteration: the training iteration, for the message.
    """
    if not losses:
        return
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    all_values = dict(zip(losses, values.tolist()))
    bad = {k: v for k, v in all_values.items() if not math.isfinite(v)}
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration} in {source}: {bad} (all terms: {all_values})"
    )
