"""Backbone wrappers with plainly visible forwards, used instead of forward hooks.

A wrapper replaces ``model.backbone`` of a detectron2 meta-architecture when the MasKD model is
built, so the meta-architecture's own ``forward`` (R-CNN, RetinaNet, FCOS, Panoptic FPN,
semantic segmentation, ...) runs unchanged:

* :class:`TokenMaskedBackbone` (stage 1) returns the masked aggregate of the receptive tokens
  for the distilled levels, so the teacher's heads run on masked features.
* :class:`RecordingBackbone` (stage 2) returns the student's features unchanged.

Both are :class:`maskd.modeling.wrappers.TransparentWrapper`: transparent in state dicts (the
wrapped backbone's parameters keep their keys, ``backbone.bottom_up.stem.conv1.weight``), and in
training they keep what they made (stage 1's masks, stage 2's student features) for the
caller's :func:`maskd.modeling.wrappers.recording` of the step.
"""

import logging
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from detectron2.modeling import Backbone
from torch import nn

from .losses import FILLS, combined_mask, masked_aggregate, neutral_fill, union_mask
from .receptive_tokens import ReceptiveTokens
from .wrappers import TransparentWrapper

__all__ = [
    "TokenMaskedBackbone",
    "masked_level",
    "teacher_view",
    "LevelMasks",
    "GATES",
    "RecordingBackbone",
    "unwrap_backbone",
]

logger = logging.getLogger(__name__)


class _TransparentBackbone(TransparentWrapper, Backbone):
    """A transparent wrapper of a detectron2 Backbone."""

    def __init__(self, inner: Backbone):
        Backbone.__init__(self)
        self._wrap(inner)

    @property
    def size_divisibility(self) -> int:
        return self.inner.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.inner.padding_constraints

    def output_shape(self):
        return self.inner.output_shape()


# How the token weights scale the masks in stage 1's aggregate (see TokenMaskedBackbone).
GATES = ("absolute", "relative", "union")


class LevelMasks(NamedTuple):
    """The receptive masks of one level in one training forward of stage 1."""

    masks: torch.Tensor  # (N, T, H, W)
    weights: Optional[torch.Tensor]  # (N, T), or None for unweighted tokens
    # (N, H, W): what the teacher sees of each cell, sum_t g_t M_t with g the weights as the
    # gate uses them, or the soft union of the masks (gate "union")
    combined: torch.Tensor


def teacher_view(masks: torch.Tensor, weights: Optional[torch.Tensor], gate: str) -> torch.Tensor:
    """What the teacher's heads see of each cell in stage 1, the combined mask c of the
    aggregate ``c F + (1 - c) fill``, as the gate (:data:`GATES`) makes it.

    Args:
        masks: (N, T, H, W) masks; weights: (N, T) token weights, or None.

    Returns:
        (N, H, W) c.
    """
    if gate == "union":
        return union_mask(masks)
    if weights is not None and gate == "relative":
        weights = weights / weights.max(dim=1, keepdim=True).values  # (N, T), max 1
    return combined_mask(masks, weights)


def masked_level(
    tokens: ReceptiveTokens, feat: torch.Tensor, fill: str, gate: str
) -> Tuple[torch.Tensor, LevelMasks]:
    """Stage 1's masked aggregate of one level: ``c F + (1 - c) fill``, c the
    :func:`teacher_view` of the tokens' masks.

    Args:
        tokens: the level's receptive tokens; feat: (N, C, H, W) frozen features (no gradient).
        fill: :func:`maskd.modeling.losses.neutral_fill`'s kind; gate: one of :data:`GATES`.

    Returns:
        ((N, C, H, W) aggregate, the level's :class:`LevelMasks`, with gradient).
    """
    masks = tokens.masks(feat)  # (N, T, H, W)
    weights = tokens.weights(feat) if tokens.weighted else None  # (N, T)
    combined = teacher_view(masks, weights, gate)  # (N, H, W)
    out = masked_aggregate(feat, masks, None, combined, neutral_fill(feat, fill))
    return out, LevelMasks(masks, weights, combined)


class TokenMaskedBackbone(_TransparentBackbone):
    """A frozen teacher backbone whose distilled levels are replaced by the tokens' masked
    aggregate ``sum_t w_t * M_t * F`` (stage 1).

    The wrapped backbone runs under ``torch.no_grad()``: its features are inputs of the tokens.
    Levels not in ``tokens`` pass through unchanged. In training mode, inside a
    :func:`recording`, the forward keeps its masks (with their gradient) as ``"masks"`` and the
    padded input size as ``"input_hw"``, for the token learner's own losses.
    """

    def __init__(
        self,
        inner: Backbone,
        tokens: nn.ModuleDict,
        fill: str = "zeros",
        gate: str = "absolute",
        elsewhere: Tuple[str, ...] = (),
    ):
        """
        Args:
            inner: the teacher's backbone, producing a dict of (N, C_l, H_l, W_l) features.
            tokens: one :class:`ReceptiveTokens` per distilled level, keyed by level name.
            elsewhere: levels of ``tokens`` that are not the backbone's (the head's logits,
                masked by :class:`maskd.modeling.logits.TokenMaskedPredictor`): held here, so
                that every stage-1 checkpoint keeps its tokens under ``backbone.tokens``.
            fill: what masked-out cells become (:func:`maskd.modeling.losses.neutral_fill`): "zeros"
                (the paper), "mean" or "blur".
            gate: how the token weights scale the masks in the aggregate: "absolute" (the
                paper, ``c = sum_t w_t M_t``), "relative" (``c = sum_t (w_t / max_s w_s)
                M_t``: the most weighted token's cells pass whole, the others by their weight
                relative to it) or "union" (``c = 1 - prod_t (1 - M_t)``: a cell passes whole
                where any token covers it; the weights stay out of the teacher's view).
        """
        super().__init__(inner)
        shapes = inner.output_shape()
        for name, rt in tokens.items():
            if name in elsewhere:
                continue
            if name not in shapes:
                raise ValueError(
                    f"receptive tokens for level '{name}', but the backbone produces only "
                    f"{sorted(shapes)}"
                )
            if not isinstance(rt, ReceptiveTokens) or rt.channels != shapes[name].channels:
                raise ValueError(
                    f"level '{name}' has {shapes[name].channels} channels, but its tokens "
                    f"expect {getattr(rt, 'channels', None)}"
                )
        if fill not in FILLS:
            raise ValueError(f"MODEL.MASKD.FILL must be one of {FILLS}, got '{fill}'")
        if gate not in GATES:
            raise ValueError(f"MODEL.MASKD.WEIGHT_GATE must be one of {GATES}, got '{gate}'")
        self.tokens = tokens
        self.elsewhere = tuple(elsewhere)
        self.fill = fill
        self.gate = gate
        self.masking = True

    def teacher_view(self, masks: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """:func:`teacher_view` under this backbone's gate."""
        return teacher_view(masks, weights, self.gate)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            The backbone's feature dict, the distilled levels masked (unmasked while
            ``self.masking`` is False: the plain teacher, for the retention of stage 1).
        """
        with torch.no_grad():
            features = self.inner(x)
        if not self.masking:
            return features
        kept = {}
        out = dict(features)
        for name, rt in self.tokens.items():
            if name in self.elsewhere:
                continue
            out[name], kept[name] = masked_level(rt, features[name], self.fill, self.gate)
        if self.training:
            self.keep(masks=kept, input_hw=tuple(x.shape[-2:]))
        return out


class RecordingBackbone(_TransparentBackbone):
    """A student backbone whose features are kept for the distillation loss (stage 2).

    Its forward returns the wrapped backbone's features unchanged; in training mode, inside a
    :func:`recording`, it keeps them as ``"features"``.
    """

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            dict of (N, C_l, H_l, W_l) features, as the wrapped backbone returns them.
        """
        features = self.inner(x)
        if self.training:
            self.keep(features=features)
        return features


def unwrap_backbone(backbone: Backbone) -> Backbone:
    """The plain backbone inside a MasKD wrapper (or the backbone itself)."""
    return backbone.inner if isinstance(backbone, _TransparentBackbone) else backbone
