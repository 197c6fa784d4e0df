"""Untrained tokens (``random_tokens``): the ablation of what stage 1 learns."""

import logging

from torch import nn

from ..receptive_tokens import build_level_tokens
from .base import MASK_SOURCE_REGISTRY
from .tokens import TokenMasks

__all__ = ["RandomTokenMasks"]

logger = logging.getLogger(__name__)


@MASK_SOURCE_REGISTRY.register()
class RandomTokenMasks(TokenMasks):
    """Tokens and weight heads of the learned ones' levels and shapes, freshly initialised as
    stage 1 starts them (tokens N(0, 0.01^2): masks near 0.5 everywhere) and frozen; used
    exactly as the learned tokens are, customised masks included. They are drawn from torch's
    global generator when the model is built (detectron2 seeds it with ``SEED``) and saved in
    the stage-2 checkpoint (``mask_source.tokens.*``)."""

    NAME = "random_tokens"
    LEARNED_TOKENS = False

    def __init__(self, tokens: nn.ModuleDict):
        """
        Args:
            tokens: level -> untrained ReceptiveTokens (frozen here).
        """
        super().__init__()
        self.tokens = tokens.requires_grad_(False)

    @classmethod
    def from_tokens(cls, tokens, **kwargs):
        first = tokens[next(iter(tokens))]
        fresh = build_level_tokens(
            {lv: rt.channels for lv, rt in tokens.items()},
            first.num_tokens,
            first.weighted,
            first.mask_norm,
            first.weight_floor,
        ).to(first.tokens.device)
        logger.info("mask source 'random_tokens': untrained tokens on levels %s", list(tokens))
        return cls(fresh, **kwargs)

    def level_tokens(self, level, tokens):
        return self.tokens[level]
