"""Receptive tokens: learnable per-level embeddings that turn a feature map into soft masks.

Notation (see the project's method page): a feature level ``x`` of shape (N, C, H, W) and T
tokens ``R`` of shape (T, C). Token t yields the mask

    M[n, t, h, w] = sigmoid(sum_c R[t, c] * x[n, c, h, w])

and, with ``weighted=True``, a small head predicts per-image token weights w of shape (N, T)
(softmax over T). The masked aggregate used in stage 1 is ``sum_t w_t * M_t * x``.
"""

import logging
import math

import torch
from torch import nn

from .losses import masked_aggregate

__all__ = ["ReceptiveTokens"]

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
        """
        if self.weight_head is None:
            raise RuntimeError("ReceptiveTokens(weighted=False) has no mask-weight head")
        self._check(x)
        logits = self.weight_head(x).flatten(1)  # (N, T)
        return logits.to(_compute_dtype(logits.dtype)).softmax(dim=1)

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
