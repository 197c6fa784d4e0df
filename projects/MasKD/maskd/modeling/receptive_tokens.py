"""Receptive tokens: learnable per-level embeddings that turn a feature map into soft masks.

Notation (see the project's method page): a feature level ``x`` of shape (N, C, H, W) and T
tokens ``R`` of shape (T, C). Token t yields the mask

    M[n, t, h, w] = sigmoid(sum_c R[t, c] * x[n, c, h, w])

and, with ``weighted=True``, a small head predicts per-image token weights w of shape (N, T)
(softmax over T). The masked aggregate used in stage 1 is ``sum_t w_t * M_t * x``.

Two opt-in forms (not the paper's; for tokens that partition the map, see the project's
mask-source page), kept with the tokens in every checkpoint (the ``form`` buffer) so that
stage 2 computes the masks and weights stage 1 learned:

* ``mask_norm="softmax"``: ``M[n, :, h, w] = softmax_t(R x[n, :, h, w])``, the masks of a cell
  sum to one (a soft partition of the map among the tokens).
* ``weight_floor=eps``: ``w = eps / T + (1 - eps) softmax(g(x))``: every token keeps at least
  ``eps / T`` of the weight, so the weights cannot become one-hot.
"""

import logging
import math
from typing import Dict

import torch
from torch import nn

from .losses import masked_aggregate

__all__ = ["ReceptiveTokens", "build_level_tokens", "MASK_NORMS", "paper_form"]

logger = logging.getLogger(__name__)

# How the mask logits become masks: "sigmoid" per token (the paper), "softmax" over the tokens.
MASK_NORMS = ("sigmoid", "softmax")
# The weight floor is kept in the ``form`` buffer in millionths (an integer tensor: exact, and
# untouched by dtype conversions of the module).
_FLOOR_UNITS = 1_000_000
FORM_KEY = "form"


def paper_form() -> torch.Tensor:
    """The ``form`` buffer of the paper's tokens (sigmoid masks, no weight floor)."""
    return torch.tensor([0, 0], dtype=torch.int64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input is float64 (never a half type)."""
    return torch.promote_types(dtype, torch.float32)


class ReceptiveTokens(nn.Module):
    """Receptive tokens of one feature level, with an optional mask-weight head.

    Attributes:
        tokens (nn.Parameter): (T, C) token embeddings, initialised N(0, 0.01^2).
        weight_head (nn.Sequential or None): Conv3x3(C->C) -> global average pool ->
            Conv1x1(C->T); its softmax over T gives the mask weights. None if not weighted.
    """

    def __init__(
        self,
        channels: int,
        num_tokens: int = 6,
        weighted: bool = True,
        mask_norm: str = "sigmoid",
        weight_floor: float = 0.0,
    ):
        """
        Args:
            channels: C, the number of channels of the feature level.
            num_tokens: T, the number of receptive tokens (detection: 6, segmentation: 8).
            weighted: whether to predict per-image token weights (on for detection).
            mask_norm: "sigmoid" (each mask on its own: the paper) or "softmax" (over the
                tokens: the masks of a cell sum to one).
            weight_floor: eps in [0, 1): each token's weight is at least eps / T (0: the
                paper's softmax). Weighted tokens only.
        """
        super().__init__()
        if channels <= 0 or num_tokens <= 0:
            raise ValueError(
                f"ReceptiveTokens needs channels > 0 and num_tokens > 0, "
                f"got channels={channels}, num_tokens={num_tokens}"
            )
        if mask_norm not in MASK_NORMS:
            raise ValueError(
                f"MODEL.MASKD.MASK_NORM must be one of {MASK_NORMS}, got '{mask_norm}'"
            )
        if not 0.0 <= weight_floor < 1.0:  # NaN fails too
            raise ValueError(f"MODEL.MASKD.WEIGHT_FLOOR must lie in [0, 1), got {weight_floor}")
        if weight_floor > 0 and not weighted:
            raise ValueError(
                f"MODEL.MASKD.WEIGHT_FLOOR = {weight_floor} needs weighted tokens "
                "(MODEL.MASKD.WEIGHTED True)"
            )
        self.channels = channels
        self.num_tokens = num_tokens
        self.weighted = weighted
        self.mask_norm = mask_norm
        self.weight_floor = round(weight_floor * _FLOOR_UNITS) / _FLOOR_UNITS
        form = [MASK_NORMS.index(mask_norm), round(weight_floor * _FLOOR_UNITS)]
        self.register_buffer(FORM_KEY, torch.tensor(form, dtype=torch.int64))
        self.tokens = nn.Parameter(torch.empty(num_tokens, channels))
        nn.init.normal_(self.tokens, mean=0.0, std=0.01)
        if weighted:
            self.weight_head = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, kernel_size=1),
            )
            for m in self.weight_head.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(m.bias)
        else:
            self.weight_head = None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_tokens={self.num_tokens}, weighted={self.weighted}, "
            f"mask_norm={self.mask_norm}, weight_floor={self.weight_floor}"
        )

    def describe_form(self) -> str:
        return f"mask_norm={self.mask_norm}, weight_floor={self.weight_floor}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Tokens saved without a ``form`` have the paper's; a file's form must be this
        module's (the masks and weights are computed from it)."""
        key = prefix + FORM_KEY
        if key not in state_dict:
            state_dict[key] = paper_form()
        theirs = torch.as_tensor(state_dict[key])
        if theirs.shape == self.form.shape and not torch.equal(theirs.to(self.form), self.form):
            code, floor = theirs.tolist()
            norm = MASK_NORMS[code] if 0 <= code < len(MASK_NORMS) else f"unknown ({code})"
            raise ValueError(
                f"receptive tokens '{prefix.rstrip('.')}' were saved with mask_norm={norm}, "
                f"weight_floor={floor / _FLOOR_UNITS}; this model's are {self.describe_form()} "
                "(MODEL.MASKD.MASK_NORM, MODEL.MASKD.WEIGHT_FLOOR)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"ReceptiveTokens expects features of shape (N, {self.channels}, H, W), "
                f"got {tuple(x.shape)}"
            )

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) features.

        Returns:
            (N, T, H, W) logits ``tokens . x[:, :, h, w]``, computed in float32 (or float64).
        """
        self._check(x)
        n, c, h, w = x.shape
        dtype = _compute_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = torch.matmul(self.tokens.to(dtype), x.to(dtype).reshape(n, c, h * w))
        return logits.view(n, self.num_tokens, h, w)  # (N, T, H, W)

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) features.

        Returns:
            (N, T, H, W) soft masks in (0, 1): plain dot product, then a sigmoid (the paper), or
            a softmax over the tokens (``mask_norm="softmax"``); never a softmax over pixels.
        """
        logits = self.mask_logits(x)  # (N, T, H, W)
        return logits.softmax(dim=1) if self.mask_norm == "softmax" else logits.sigmoid()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) features.

        Returns:
            (N, T) token weights, softmax over T (float32 or float64); with a weight floor
            eps, ``eps / T + (1 - eps) * softmax``.

        The head is Conv3x3 -> global average pool -> Conv1x1. Nothing non-linear lies between
        the 3x3 conv and the pool, so the pooled output equals the 3x3 kernel applied to nine
        shifted means of x (each the total sum less a border row and/or column, the zero
        padding being outside): an exact (N, C, 3, 3) computation instead of a (C x C x 3 x 3)
        convolution over every pixel.
        """
        if self.weight_head is None:
            raise RuntimeError("ReceptiveTokens(weighted=False) has no mask-weight head")
        self._check(x)
        conv3, _, conv1 = self.weight_head
        n, c, h, w = x.shape
        dtype = _compute_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            total = x.sum(dim=(2, 3))  # (N, C)
            zero = torch.zeros_like(total)
            # Kernel row i reads rows shifted by i - 1: i = 0 misses the last row, i = 2 the first.
            rows = torch.stack([x[:, :, -1, :].sum(-1), zero, x[:, :, 0, :].sum(-1)], dim=2)
            cols = torch.stack([x[:, :, :, -1].sum(-1), zero, x[:, :, :, 0].sum(-1)], dim=2)
            corner = torch.zeros(n, c, 3, 3, dtype=dtype, device=x.device)
            corner[:, :, 0, 0] = x[:, :, -1, -1]
            corner[:, :, 0, 2] = x[:, :, -1, 0]
            corner[:, :, 2, 0] = x[:, :, 0, -1]
            corner[:, :, 2, 2] = x[:, :, 0, 0]
            window_sums = total[:, :, None, None] - rows[:, :, :, None] - cols[:, :, None, :]
            window_sums = window_sums + corner  # (N, C, 3, 3)
            pooled = torch.einsum("ocij,ncij->no", conv3.weight.to(dtype), window_sums)
            pooled = pooled / (h * w) + conv3.bias.to(dtype)  # (N, C)
            logits = pooled @ conv1.weight.to(dtype).flatten(1).t() + conv1.bias.to(dtype)
        weights = logits.softmax(dim=1)  # (N, T)
        if self.weight_floor > 0:
            weights = self.weight_floor / self.num_tokens + (1.0 - self.weight_floor) * weights
        return weights

    def mask_features(self, x: torch.Tensor) -> torch.Tensor:
        """The masked aggregate of stage 1.

        Args:
            x: (N, C, H, W) features.

        Returns:
            (N, C, H, W) ``sum_t w_t * M_t * x`` (unweighted: ``sum_t M_t * x``), computed as
            ``x * (sum_t w_t M_t)`` without an (N, T, C, H, W) intermediate, in x's dtype.
        """
        weights = self.weights(x) if self.weight_head is not None else None
        return masked_aggregate(x, self.masks(x), weights)  # (N, C, H, W)


def build_level_tokens(
    channels: Dict[str, int],
    num_tokens: int,
    weighted: bool,
    mask_norm: str = "sigmoid",
    weight_floor: float = 0.0,
) -> nn.ModuleDict:
    """One :class:`ReceptiveTokens` per feature level.

    Args:
        channels: level name -> number of channels C of that level (in distillation order).
        num_tokens: T per level.
        weighted: whether each level has a mask-weight head.
        mask_norm, weight_floor: the tokens' form (:class:`ReceptiveTokens`).
    """
    return nn.ModuleDict(
        {
            name: ReceptiveTokens(c, num_tokens, weighted, mask_norm, weight_floor)
            for name, c in channels.items()
        }
    )
