"""A semantic segmentation head's output logits as a distillation point (the paper's
segmentation recipe), beside the backbone levels.

detectron2's semantic heads (``DeepLabV3Head``, ``DeepLabV3PlusHead``, ``SemSegFPNHead``) end in a
1x1 conv named ``predictor`` whose output, the class logits at the head's ``common_stride``, is
upsampled to the image only for inference and for the loss. The distillation point
:data:`LOGITS` is that output: named in ``MODEL.MASKD.IN_FEATURES`` (``["logits"]``), it is a
level like the backbone's, of ``NUM_CLASSES`` channels at stride ``common_stride``:

* stage 1 wraps the teacher's ``predictor`` in a :class:`TokenMaskedPredictor`, so that the
  head's own loss is computed from the masked logits;
* stage 2 wraps the student's ``predictor`` in a :class:`LogitsRecorder` and computes the
  teacher's logits with :func:`teacher_logits`; both are compared under the masks as features
  are.
"""

import logging
from typing import Dict, Optional

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from .backbone import masked_level
from .wrappers import TransparentModule, TransparentWrapper

__all__ = [
    "LOGITS",
    "logits_shape",
    "point_shapes",
    "teacher_logits",
    "LogitsRecorder",
    "TokenMaskedPredictor",
]

logger = logging.getLogger(__name__)

# The level name of a semantic head's output logits.
LOGITS = "logits"


def _predictor(model: nn.Module) -> Optional[nn.Module]:
    """The plain ``sem_seg_head.predictor`` of a model (unwrapped), or None."""
    head = getattr(model, "sem_seg_head", None)
    predictor = getattr(head, "predictor", None) if head is not None else None
    if isinstance(predictor, TransparentWrapper):
        predictor = predictor.inner
    return predictor if isinstance(predictor, nn.Conv2d) else None


def logits_shape(model: nn.Module) -> Optional[ShapeSpec]:
    """The shape of a model's semantic logits before upsampling (channels: the classes, stride:
    the head's ``common_stride``), or None for a model without a semantic head ending in a 1x1
    ``predictor``."""
    predictor = _predictor(model)
    stride = getattr(getattr(model, "sem_seg_head", None), "common_stride", None)
    if predictor is None or not isinstance(stride, int):
        return None
    return ShapeSpec(channels=predictor.out_channels, stride=stride)


def point_shapes(model: nn.Module, with_logits: bool = False) -> Dict[str, ShapeSpec]:
    """The distillation points of a model: its backbone levels, and :data:`LOGITS` where asked.

    Raises:
        ValueError: ``with_logits`` for a model without semantic logits, naming its heads.
    """
    shapes = dict(model.backbone.output_shape())
    if with_logits:
        shape = logits_shape(model)
        if shape is None:
            head = getattr(model, "sem_seg_head", None)
            raise ValueError(
                f"level '{LOGITS}' (a semantic head's output logits) was asked for, but the "
                f"{type(model).__name__} model has "
                + (
                    f"a {type(head).__name__} without a 1x1 'predictor' and a 'common_stride'"
                    if head is not None
                    else "no sem_seg_head"
                )
                + f"; its levels are {list(shapes)}"
            )
        shapes[LOGITS] = shape
    return shapes


def teacher_logits(teacher: nn.Module, features: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A frozen teacher's semantic logits before upsampling, from its backbone features.

    Args:
        teacher: a semantic segmentor (``sem_seg_head`` of detectron2's kinds).
        features: its backbone's feature dict.

    Returns:
        (N, K, H / s, W / s) logits, s the head's ``common_stride``.
    """
    head = teacher.sem_seg_head
    if hasattr(head, "layers"):  # SemSegFPNHead, DeepLabV3PlusHead: features -> logits
        return head.layers(features)
    if hasattr(head, "aspp"):  # DeepLabV3Head: ASPP then the predictor
        return head.predictor(head.aspp(features[head.in_features[0]]))
    raise ValueError(
        f"{type(head).__name__} has neither layers() nor an ASPP: its logits cannot be computed "
        "without its loss; distil a backbone level instead"
    )


class LogitsRecorder(TransparentModule):
    """A student's ``sem_seg_head.predictor`` whose output (the logits before upsampling) is
    kept as ``"logits"`` for the distillation loss, inside a
    :func:`maskd.modeling.wrappers.recording`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) head features -> (N, K, H, W) logits, unchanged."""
        logits = self.inner(x)
        if self.training:
            self.keep(logits=logits)
        return logits


class TokenMaskedPredictor(TransparentModule):
    """A frozen teacher's ``sem_seg_head.predictor`` whose logits are replaced by the receptive
    tokens' masked aggregate (stage 1), so that the head's own loss is computed from it.

    The tokens are held by reference (they belong to the teacher's
    :class:`maskd.modeling.backbone.TokenMaskedBackbone`, under the level :data:`LOGITS`, so that
    every stage-1 checkpoint keeps its tokens under one prefix). In training, inside a
    recording, the forward keeps ``{"logits": LevelMasks}`` as ``"masks"``.
    """

    def __init__(self, inner: nn.Module, tokens: nn.Module, fill: str, gate: str):
        """
        Args:
            inner: the teacher's predictor (1x1 conv).
            tokens: the :class:`maskd.modeling.receptive_tokens.ReceptiveTokens` of the logits.
            fill, gate: as :class:`maskd.modeling.backbone.TokenMaskedBackbone`'s.
        """
        super().__init__(inner)
        if tokens.channels != inner.out_channels:
            raise ValueError(
                f"the tokens of '{LOGITS}' expect {tokens.channels} channels, the teacher "
                f"predicts {inner.out_channels} classes"
            )
        self.__dict__["level_tokens"] = tokens  # not a child: saved with the backbone's
        self.fill = fill
        self.gate = gate
        self.masking = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) head features -> (N, K, H, W) masked logits (plain while ``masking`` is
        False)."""
        with torch.no_grad():
            logits = self.inner(x)
        if not self.masking:
            return logits
        out, level_masks = masked_level(self.level_tokens, logits, self.fill, self.gate)
        if self.training:
            self.keep(masks={LOGITS: level_masks})
        return out
