"""MasKD: Masked Distillation with Receptive Tokens (ICLR 2023) for Detectron2.

Importing the package registers ``MasKDTokenLearner`` (stage 1) and ``MasKD`` (stage 2) in
detectron2's ``META_ARCH_REGISTRY``.
"""

from .backbone import RecordingBackbone, TokenMaskedBackbone
from .checkpoint import MasKDCheckpointer, load_tokens
from .config import add_maskd_config
from .losses import dice_diversity_loss, masked_aggregate, masked_distillation_loss
from .meta_arch import MasKD  # registration
from .receptive_tokens import ReceptiveTokens
from .token_learner import MasKDTokenLearner  # registration

__all__ = [
    "MasKD",
    "MasKDTokenLearner",
    "MasKDCheckpointer",
    "ReceptiveTokens",
    "RecordingBackbone",
    "TokenMaskedBackbone",
    "add_maskd_config",
    "dice_diversity_loss",
    "load_tokens",
    "masked_aggregate",
    "masked_distillation_loss",
]
