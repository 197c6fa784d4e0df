"""Receptive tokens: learnable per-level embeddings that turn a feature map into soft masks.

Notation (see the project's method page): a feature level ``x`` of shape (N, C, H, W) and T
tokens ``R`` of shape (T, C). Token t yields the mask

    M[n, t, h, w] = sigmoid(sum_c R[t, c] * x[n, c, h, w])

and, with ``weighted=True``, a small head predicts per-image token weights w of shape (N, T)
(softmax over T). The masked aggregate used in stage 1 is ``sum_t w_t * M_t * x``.
"""

import logging
import math
from typing import Dict

import torch
from torch import nn

from .losses import masked_aggregate

__all__ = ["ReceptiveTokens", "build_level_tokens"]

logger = logging.getLogger(__name__)


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

    def __init__(self, channels: int, num_tokens: int = 6, weighted: bool = True):
        """
        Args:
            channels: C, the number of channels of the feature level.
            num_tokens: T, the number of receptive tokens (detection: 6, segmentation: 8).
            weighted: whether to predict per-image token weights (on for detection).
        """
        super().__init__()
        if channels <= 0 or num_tokens <= 0:
            raise ValueError(
                f"ReceptiveTokens needs channels > 0 and num_tokens > 0, "
                f"got channels={channels}, num_tokens={num_tokens}"
            )
        self.channels = channels
        self.num_tokens = num_tokens
        self.weighted = weighted
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
        return f"channels={self.channels}, num_tokens={self.num_tokens}, weighted={self.weighted}"

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
            (N, T, H, W) soft masks in (0, 1): plain dot product, sigmoid, no softmax over pixels.
        """
        return self.mask_logits(x).sigmoid()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) features.

        Returns:
            (N, T) token weights, softmax over T (float32 or float64).

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
        return logits.softmax(dim=1)  # (N, T)

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


def build_level_tokens(channels: Dict[str, int], num_tokens: int, weighted: bool) -> nn.ModuleDict:
    """One :class:`ReceptiveTokens` per feature level.

    Args:
        channels: level name -> number of channels C of that level (in distillation order).
        num_tokens: T per level.
        weighted: whether each level has a mask-weight head.
    """
    return nn.ModuleDict(
        {name: ReceptiveTokens(c, num_tokens, weighted) for name, c in channels.items()}
    )
