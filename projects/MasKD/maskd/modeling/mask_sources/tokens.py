"""The paper's masks: the learned receptive tokens on the teacher's features (``tokens``)."""

import torch

from .base import MASK_SOURCE_REGISTRY, MaskSource

__all__ = ["TokenMasks"]


def token_masks(tokens, teacher, valid, sizes):
    """Masks and weights of receptive tokens on one level.

    Args:
        tokens: a ReceptiveTokens.
        teacher: (N, C, H, W) teacher features.
        valid: (N, 1, H, W) image-area cells, or None (the padded batch).
        sizes: N (h_l, w_l) image-area sizes, for the weights when ``valid`` is given.

    Returns:
        ((N, T, H, W) masks, zero outside ``valid``; (N, T) weights or None). With ``valid``
        the weights are pooled over each image's own area.
    """
    masks = tokens.masks(teacher)  # (N, T, H, W)
    weights = None
    if valid is None:
        weights = tokens.weights(teacher) if tokens.weighted else None
        return masks, weights
    masks = masks * valid
    if tokens.weighted:
        weights = torch.cat(
            [tokens.weights(teacher[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)]
        )  # (N, T)
    return masks, weights


@MASK_SOURCE_REGISTRY.register()
class TokenMasks(MaskSource):
    """``M = sigmoid(R F^T)`` of the frozen learned tokens and their weights (the paper);
    after the warm-up multiplied by the same tokens' masks on the aligned student features."""

    NAME = "tokens"
    LEARNED_TOKENS = True
    CUSTOMISABLE = True

    def level_tokens(self, level, tokens):
        """The ReceptiveTokens whose masks this source uses at ``level`` (the learned ones)."""
        return tokens

    def forward(self, ctx):
        tokens = self.level_tokens(ctx.level, ctx.tokens)
        return token_masks(tokens, ctx.teacher, ctx.valid, ctx.sizes)

    def customise(self, ctx, aligned):
        return self.level_tokens(ctx.level, ctx.tokens).masks(aligned)
