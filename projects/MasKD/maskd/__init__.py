"""MasKD: Masked Distillation with Receptive Tokens (ICLR 2023) for Detectron2.

Importing the package registers ``MasKDTokenLearner`` (stage 1) and ``MasKD`` (stage 2) in
detectron2's ``META_ARCH_REGISTRY``, the head-level KD terms in
:data:`maskd.head_kd.HEAD_KD_REGISTRY` and the mask sources of stage 2 in
:data:`maskd.mask_sources.MASK_SOURCE_REGISTRY`.
"""

from .backbone import RecordingBackbone, TokenMaskedBackbone
from .checkpoint import MasKDCheckpointer, load_tokens, tokens_from_file
from .config import add_maskd_config, get_maskd_cfg, load_config
from .head_kd import HEAD_KD_REGISTRY, DenseRegressionKD, HeadKD, RoIRegressionKD
from .losses import dice_diversity_loss, masked_aggregate, masked_distillation_loss
from .mask_sources import MASK_SOURCE_REGISTRY, MaskSource
from .meta_arch import MasKD  # registration
from .receptive_tokens import ReceptiveTokens
from .teacher import build_teacher
from .token_learner import MasKDTokenLearner  # registration

__all__ = [
    "MasKD",
    "MasKDTokenLearner",
    "MasKDCheckpointer",
    "ReceptiveTokens",
    "RecordingBackbone",
    "TokenMaskedBackbone",
    "HEAD_KD_REGISTRY",
    "HeadKD",
    "RoIRegressionKD",
    "DenseRegressionKD",
    "MASK_SOURCE_REGISTRY",
    "MaskSource",
    "add_maskd_config",
    "get_maskd_cfg",
    "load_config",
    "build_teacher",
    "tokens_from_file",
    "dice_diversity_loss",
    "load_tokens",
    "masked_aggregate",
    "masked_distillation_loss",
]
