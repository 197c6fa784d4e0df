"""MasKD: Masked Distillation with Receptive Tokens (ICLR 2023) for Detectron2.

Importing the package registers ``MasKDTokenLearner`` (stage 1) and ``MasKD`` (stage 2) in
detectron2's ``META_ARCH_REGISTRY``, the head-level KD terms in
:data:`maskd.modeling.head_kd.HEAD_KD_REGISTRY` and the mask sources of stage 2 in
:data:`maskd.modeling.mask_sources.MASK_SOURCE_REGISTRY`.
"""

from . import model_zoo
from .checkpoint import MasKDCheckpointer, load_tokens, tokens_from_file
from .config import add_maskd_config, get_maskd_cfg, load_config
from .modeling.backbone import RecordingBackbone, TokenMaskedBackbone
from .modeling.head_kd import HEAD_KD_REGISTRY, DenseRegressionKD, HeadKD, RoIRegressionKD
from .modeling.losses import dice_diversity_loss, masked_aggregate, masked_distillation_loss
from .modeling.mask_sources import MASK_SOURCE_REGISTRY, MaskSource
from .modeling.meta_arch.maskd import MasKD  # registration
from .modeling.meta_arch.token_learner import MasKDTokenLearner  # registration
from .modeling.receptive_tokens import ReceptiveTokens
from .modeling.teacher import build_teacher

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
    "model_zoo",
]
