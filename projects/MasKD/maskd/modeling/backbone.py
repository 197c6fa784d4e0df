"""Backbone wrappers with plainly visible forwards, used instead of forward hooks.

A wrapper replaces ``model.backbone`` of a detectron2 meta-architecture when the MasKD model is
built, so the meta-architecture's own ``forward`` (R-CNN, RetinaNet, FCOS, Panoptic FPN,
semantic segmentation, ...) runs unchanged:

* :class:`TokenMaskedBackbone` (stage 1) returns the masked aggregate of the receptive tokens
  for the distilled levels, so the teacher's heads run on masked features.
* :class:`RecordingBackbone` (stage 2) returns the student's features unchanged.

What a wrapper's forward made (stage 1's masks, stage 2's student features, the head outputs of
:mod:`maskd.modeling.head_kd`) is kept only inside a :func:`recording` block opened by the
caller, and read in that block with :meth:`TransparentWrapper.recorded`: nothing outlives the
step that made it, and a forward nobody records (inference, visualisation) keeps nothing.

Both are transparent in state dicts: the wrapped backbone's parameters keep the keys they have
without the wrapper (``backbone.bottom_up.stem.conv1.weight``), so plain detectron2 checkpoints
load into a wrapped model, and a wrapped model's checkpoint loads into a plain one.
"""

import contextlib
import logging
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import torch
from detectron2.modeling import Backbone
from torch import nn

from .._compat import register_state_dict_hook
from .losses import FILLS, combined_mask, masked_aggregate, neutral_fill
from .receptive_tokens import ReceptiveTokens

__all__ = [
    "TokenMaskedBackbone",
    "LevelMasks",
    "GATES",
    "RecordingBackbone",
    "TransparentWrapper",
    "recording",
    "unwrap_backbone",
]

logger = logging.getLogger(__name__)

_INNER = "inner"


class TransparentWrapper:
    """Mixin for a module that wraps another as ``self.inner``: that level is hidden in
    state-dict keys (saving and loading), and attributes it lacks are read from the inner
    module, so code that used the wrapped module keeps working.

    A wrapper's forward hands what it made to an open :func:`recording` with :meth:`keep`;
    the caller reads it with :meth:`recorded` inside that block.
    """

    def _wrap(self, inner: nn.Module) -> None:
        if isinstance(inner, TransparentWrapper):
            raise ValueError(f"{type(inner).__name__} is already wrapped")
        self.inner = inner
        self._record: Optional[Dict[str, Any]] = None  # open only inside recording()
        register_state_dict_hook(self, _hide_inner)
        self.register_load_state_dict_pre_hook(_expand_inner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if _INNER in modules and name != _INNER:
                return getattr(modules[_INNER], name)
            raise

    def own_keys(self) -> List[str]:
        """Names of this wrapper's own children (not the wrapped module's)."""
        return [name for name, _ in self.named_children() if name != _INNER]

    def keep(self, **values: Any) -> None:
        """Called by the forward: keep ``values`` for the open recording (none open: dropped)."""
        if self._record is not None:
            self._record.update(values)

    def recorded(self, key: str) -> Any:
        """What the forwards of the open recording kept under ``key``.

        Raises:
            RuntimeError: no recording is open, or no forward inside it kept ``key``.
        """
        if self._record is None:
            raise RuntimeError(
                f"{type(self).__name__}.recorded('{key}') outside a recording() block"
            )
        if key not in self._record:
            raise RuntimeError(
                f"{type(self).__name__}: no '{key}' was made in this step (the model's forward "
                f"did not call its {type(self.inner).__name__} in training mode)"
            )
        return self._record[key]


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[None]:
    """Open a recording on every :class:`TransparentWrapper` inside ``model`` (``model``
    included): inside the block, their forwards keep what they make (:meth:`keep`) and
    :meth:`TransparentWrapper.recorded` reads it; on leaving it everything kept is dropped.

    Raises:
        RuntimeError: a recording is already open on one of them (nested steps).
    """
    wrappers = [m for m in model.modules() if isinstance(m, TransparentWrapper)]
    busy = [type(m).__name__ for m in wrappers if m._record is not None]
    if busy:
        raise RuntimeError(f"a recording is already open on {busy}")
    try:
        for m in wrappers:
            m._record = {}
        yield
    finally:
        for m in wrappers:
            m._record = None


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


def _hide_inner(module, state_dict, prefix, local_metadata):
    """state_dict hook: ``<prefix>inner.<key>`` -> ``<prefix><key>``."""
    inner_prefix = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(inner_prefix)]:
        state_dict[prefix + key[len(inner_prefix) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions, keyed by module prefix without the final dot
        metadata.pop(prefix + _INNER, None)  # the wrapper's own entry stands for it
        for key in [k for k in metadata if k.startswith(inner_prefix)]:
            metadata[prefix + key[len(inner_prefix) :]] = metadata.pop(key)


def _expand_inner(module, state_dict, prefix, *args):
    own = tuple(prefix + name + "." for name in module.own_keys())
    inner_prefix = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(own) and not key.startswith(inner_prefix):
            state_dict[inner_prefix + key[len(prefix) :]] = state_dict.pop(key)


# How the token weights scale the masks in stage 1's aggregate (see TokenMaskedBackbone).
GATES = ("absolute", "relative")


class LevelMasks(NamedTuple):
    """The receptive masks of one level in one training forward of stage 1."""

    masks: torch.Tensor  # (N, T, H, W)
    weights: Optional[torch.Tensor]  # (N, T), or None for unweighted tokens
    combined: torch.Tensor  # (N, H, W): sum_t g_t M_t, g the weights as the gate uses them


class TokenMaskedBackbone(_TransparentBackbone):
    """A frozen teacher backbone whose distilled levels are replaced by the tokens' masked
    aggregate ``sum_t w_t * M_t * F`` (stage 1).

    The wrapped backbone runs under ``torch.no_grad()``: its features are inputs of the tokens.
    Levels not in ``tokens`` pass through unchanged. In training mode, inside a
    :func:`recording`, the forward keeps its masks (with their gradient) as ``"masks"`` and the
    padded input size as ``"input_hw"``, for the token learner's own losses.
    """

    def __init__(
        self, inner: Backbone, tokens: nn.ModuleDict, fill: str = "zeros", gate: str = "absolute"
    ):
        """
        Args:
            inner: the teacher's backbone, producing a dict of (N, C_l, H_l, W_l) features.
            tokens: one :class:`ReceptiveTokens` per distilled level, keyed by level name.
            fill: what masked-out cells become (:func:`maskd.modeling.losses.neutral_fill`): "zeros"
                (the paper), "mean" or "blur".
            gate: how the token weights scale the masks in the aggregate: "absolute" (the
                paper, ``c = sum_t w_t M_t``) or "relative" (``c = sum_t (w_t / max_s w_s)
                M_t``: the most weighted token's cells pass whole, the others by their weight
                relative to it).
        """
        super().__init__(inner)
        shapes = inner.output_shape()
        for name, rt in tokens.items():
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
        self.fill = fill
        self.gate = gate
        self.masking = True

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
            feat = features[name]
            masks = rt.masks(feat)  # (N, T, H, W)
            weights = rt.weights(feat) if rt.weighted else None  # (N, T)
            gates = weights
            if weights is not None and self.gate == "relative":
                gates = weights / weights.max(dim=1, keepdim=True).values  # (N, T), max 1
            combined = combined_mask(masks, gates)  # (N, H, W)
            fill = neutral_fill(feat, self.fill)
            out[name] = masked_aggregate(feat, masks, gates, combined, fill)  # (N, C, H, W)
            kept[name] = LevelMasks(masks, weights, combined)
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
