"""Where the masks of the masked feature loss come from, and their registry.

A mask source is one class in one file, registered with ``@MASK_SOURCE_REGISTRY.register()``
under its ``NAME``; ``MODEL.MASKD.MASK_SOURCE`` (LazyConfig: ``MasKD(mask_source=...)``) picks
one. For every distilled level and training step it turns what the step offers (the teacher's
features, that level's frozen receptive tokens, the ground truth) into the (N, T, H, W) masks and
optional (N, T) weights of :func:`maskd.modeling.losses.masked_distillation_loss`. The paper's source is
``tokens``; the others are its ablations (``uniform``: whole-map mimicking, FitNet-style;
``gt_boxes``: the ground-truth box prior; ``random_tokens``: untrained tokens; ``gt_partition``,
``gt_instances``: oracle partitions of the image by its ground truth).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from torch import nn

from ..._compat import ConfigNameRegistry
from ..receptive_tokens import ReceptiveTokens

__all__ = [
    "MASK_SOURCE_REGISTRY",
    "LevelContext",
    "MaskSource",
    "mask_source_class",
    "add_mask_source_config",
    "build_mask_source",
]

MASK_SOURCE_REGISTRY = ConfigNameRegistry("MASKD_MASK_SOURCE", key="NAME")
MASK_SOURCE_REGISTRY.__doc__ = """Mask sources of MasKD's masked feature loss (MaskSource)."""

Masks = Tuple[torch.Tensor, Optional[torch.Tensor]]


@dataclass
class LevelContext:
    """What a training step offers a mask source at one distilled level.

    Attributes:
        level: the teacher level's name.
        tokens: that level's frozen receptive tokens.
        teacher: (N, C_t, H, W) teacher features of the level.
        stride: the level's stride (pixels per cell).
        valid: (N, 1, H, W) 0/1 image-area cells where the loss is over the image area only
            (masks must be zero elsewhere), or None where it covers the padded batch.
        sizes: N (h_l, w_l) image-area sizes at this level.
        batched_inputs: the step's inputs (``instances`` hold the ground truth in the batch's
            pixel coordinates).
    """

    level: str
    tokens: ReceptiveTokens
    teacher: torch.Tensor
    stride: int
    valid: Optional[torch.Tensor]
    sizes: Sequence[Tuple[int, int]]
    batched_inputs: List[dict]


class MaskSource(nn.Module):
    """The masks of the masked feature loss at one level.

    Class attributes:
        NAME: its value of ``MODEL.MASKD.MASK_SOURCE``.
        LEARNED_TOKENS: whether it reads the learned tokens (then stage 2 needs
            ``TOKENS_WEIGHTS``; else the tokens only name the distilled levels).
        CUSTOMISABLE: whether it has student-customised masks (:meth:`customise`); a source
            without them refuses ``CUSTOM_MASK_WARMUP >= 0``.

    Subclasses implement :meth:`forward`, and may add config keys (:meth:`add_config`,
    :meth:`from_config`) and build from the tokens (:meth:`from_tokens`).
    """

    NAME = ""
    LEARNED_TOKENS = False
    CUSTOMISABLE = False

    @classmethod
    def add_config(cls, maskd_node: CfgNode) -> None:
        """Add the source's own keys to ``MODEL.MASKD`` (none by default)."""

    @classmethod
    def from_config(cls, maskd_node: CfgNode) -> dict:
        """Keyword arguments of :meth:`from_tokens` from ``MODEL.MASKD`` (none by default)."""
        return {}

    @classmethod
    def from_tokens(cls, tokens: nn.ModuleDict, **kwargs) -> "MaskSource":
        """Build the source for the distilled levels (``tokens``: level -> the frozen
        ReceptiveTokens); ``kwargs`` are :meth:`from_config`'s."""
        return cls(**kwargs)

    def forward(self, ctx: LevelContext) -> Masks:
        """The masks of one level (MasKD calls it under ``torch.no_grad()``).

        Args:
            ctx: the level's teacher features, tokens, stride, image area and the step's
                inputs (:class:`LevelContext`).

        Returns:
            ((N, T, H, W) masks in [0, 1], (N, T) weights or None).
        """
        raise NotImplementedError

    def customise(self, ctx: LevelContext, aligned: torch.Tensor):
        """(N, T, H, W) student-side masks on the aligned student features (N, C_t, H, W) of the
        level of ``ctx``, by which the teacher's masks are multiplied after the warm-up (called
        under ``torch.no_grad()``)."""
        raise NotImplementedError(f"mask source '{self.NAME}' has no student-customised masks")

    def extra_repr(self) -> str:
        return self.NAME


def mask_source_class(name: str) -> type:
    """The registered source called ``name``.

    Raises:
        KeyError: naming ``MODEL.MASKD.MASK_SOURCE`` and the registered names.
    """
    if name not in MASK_SOURCE_REGISTRY:
        raise KeyError(
            f"MODEL.MASKD.MASK_SOURCE = '{name}' is not a registered mask source; registered: "
            f"{sorted(n for n, _ in MASK_SOURCE_REGISTRY)} (a source of your own registers with "
            "@MASK_SOURCE_REGISTRY.register() in a module imported before the model is built)"
        )
    return MASK_SOURCE_REGISTRY.get(name)


def add_mask_source_config(maskd_node: CfgNode) -> None:
    """Add ``MASK_SOURCE`` and the keys of every registered source to ``MODEL.MASKD``."""
    # Where the masks of loss_maskd come from: "tokens" (the paper), "uniform" (whole-map
    # mimicking), "gt_boxes" (the ground-truth boxes), "random_tokens" (untrained tokens),
    # "gt_partition" / "gt_instances" (oracle partitions: boxes and background, or each box
    # and background, as separately weighted masks).
    maskd_node.MASK_SOURCE = "tokens"
    for _, cls in sorted(MASK_SOURCE_REGISTRY):
        cls.add_config(maskd_node)


def build_mask_source(name: str, tokens: nn.ModuleDict, **kwargs) -> MaskSource:
    """The source ``name`` built for the levels of ``tokens``."""
    return mask_source_class(name).from_tokens(tokens, **kwargs)
