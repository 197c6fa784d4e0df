"""Stage 1: learn the receptive tokens with the teacher frozen."""

import contextlib
import inspect
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import locate
from omegaconf import DictConfig
from torch import nn

from ..._compat import NORM_TYPES
from ...checkpoint.provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    config_fingerprint,
    fingerprint,
    fingerprint_tensor,
)
from ...utils.numbers import check_fraction, check_number
from ..backbone import LevelMasks, TokenMaskedBackbone
from ..diagnostics import level_sizes, put_level_statistics
from ..logits import LOGITS, TokenMaskedPredictor, point_shapes
from ..losses import (
    dice_diversity_loss,
    min_token_area_loss,
    raise_if_not_finite,
    saliency_cell_loss,
)
from ..pairing import resolve_channel_orders, resolve_in_features, teacher_batch
from ..receptive_tokens import build_level_tokens
from ..teacher import freeze, head_levels, teacher_from_config
from ..wrappers import recording

__all__ = ["MasKDTokenLearner", "DICE_PAIRS"]

logger = logging.getLogger(__name__)

# The pairs of tokens the Dice loss compares: all (the paper), or weighted by w_i w_j.
DICE_PAIRS = ("all", "weighted")


@contextlib.contextmanager
def task_loss_mode(teacher: nn.Module):
    """Let a frozen teacher compute its training losses, then put it back in eval mode.

    detectron2 meta-architectures return losses only in training mode, so the teacher's heads
    run in training mode inside this block, while its backbone and every normalisation layer
    stay in inference mode (running statistics are neither used from the batch nor updated).
    """
    teacher.train()
    teacher.backbone.inner.eval()
    for m in teacher.modules():
        if isinstance(m, NORM_TYPES):
            m.eval()
    try:
        yield
    finally:
        teacher.eval()


def _check_objective(
    num_tokens: int,
    weighted: bool,
    dice_weight: float,
    area_weight: float,
    dice_pairs: str,
    min_token_area: float,
    weight_gate: str = "absolute",
    saliency_weight: float = 0.0,
) -> None:
    """Raise ValueError, naming the config key, for a stage-1 objective that cannot work."""
    check_number(dice_weight, "MODEL.MASKD.DICE_WEIGHT", zero_allowed=True)
    check_number(area_weight, "MODEL.MASKD.AREA_WEIGHT", zero_allowed=True)
    if dice_pairs not in DICE_PAIRS:
        raise ValueError(f"MODEL.MASKD.DICE_PAIRS must be one of {DICE_PAIRS}, got '{dice_pairs}'")
    if dice_pairs == "weighted" and not weighted:
        raise ValueError("MODEL.MASKD.DICE_PAIRS 'weighted' needs weighted tokens")
    check_fraction(min_token_area, "MODEL.MASKD.MIN_TOKEN_AREA")
    check_number(saliency_weight, "MODEL.MASKD.SALIENCY_WEIGHT", zero_allowed=True)
    if weight_gate == "union" and weighted and saliency_weight == 0:
        raise ValueError(
            "MODEL.MASKD.WEIGHT_GATE 'union' keeps the token weights out of the teacher's view, "
            "so the task loss cannot train them: fit them to the teacher's saliency "
            "(MODEL.MASKD.SALIENCY_WEIGHT > 0), or use MODEL.MASKD.WEIGHTED False"
        )
    if num_tokens < 2 and dice_weight > 0:
        raise ValueError(
            f"MODEL.MASKD.NUM_TOKENS = {num_tokens}: the Dice loss compares pairs of tokens, so "
            "with one token it is always 0; use at least 2 tokens, or DICE_WEIGHT 0.0"
        )


def _teacher_digests(teacher: nn.Module, from_checkpoint: bool) -> Dict[str, torch.Tensor]:
    """The buffers that record which teacher the tokens are learned for: its weights'
    fingerprint (all zeros when ``from_checkpoint``: not known yet, the checkpoint to be loaded
    brings it) and its config's (preprocessing and backbone settings, known in either case);
    each a (32,) uint8 tensor (:mod:`maskd.checkpoint.provenance`)."""
    if from_checkpoint:
        weights = torch.zeros(32, dtype=torch.uint8)
    else:
        weights = fingerprint_tensor(fingerprint(teacher.state_dict()))
    return {FINGERPRINT_KEY: weights, CONFIG_KEY: fingerprint_tensor(config_fingerprint(teacher))}


@META_ARCH_REGISTRY.register()
class MasKDTokenLearner(nn.Module):
    """Stage 1 of MasKD: a frozen teacher whose distilled feature levels go through receptive
    tokens; only the tokens (and their mask-weight heads) are trained.

    Training: the teacher's own heads run on the masked aggregate ``sum_t w_t M_t * F`` of each
    distilled level, with the ordinary ground truth; the losses are the teacher's task losses
    plus ``loss_dice`` (the Dice diversity loss summed over levels, times ``dice_weight``).
    Inference: the teacher's predictions on masked features.

    Opt-in levers for tokens that partition the map (not the paper's; 0 / the paper's value
    leaves each off): the tokens' form (``mask_norm``, ``weight_floor``), the ``fill`` of
    masked-out cells, the weights as relative gates (``weight_gate``), Dice over weighted pairs
    (``dice_pairs``), a minimum area per token (``min_token_area``, ``loss_token_area``) and the
    area prior (``area_weight``, ``loss_area``).

    Attributes:
        teacher: the teacher meta-architecture; its ``backbone`` is a
            :class:`TokenMaskedBackbone` holding the tokens.
        tokens: (property) level name -> ReceptiveTokens, i.e. ``teacher.backbone.tokens``.
    """

    @configurable
    def __init__(
        self,
        *,
        teacher: nn.Module,
        in_features: Optional[List[str]] = None,
        num_tokens: int = 6,
        weighted: bool = True,
        dice_weight: float = 1.0,
        area_weight: float = 0.0,
        teacher_from_checkpoint: bool = False,
        input_format: Optional[str] = None,
        mask_norm: str = "sigmoid",
        weight_floor: float = 0.0,
        fill: str = "zeros",
        dice_pairs: str = "all",
        min_token_area: float = 0.0,
        weight_gate: str = "absolute",
        saliency_weight: float = 0.0,
    ):
        """
        Args:
            teacher: a detectron2 meta-architecture with a ``backbone`` (R-CNN, RetinaNet,
                FCOS, Panoptic FPN, SemanticSegmentor, ...), with its trained weights loaded
                (:func:`maskd.modeling.teacher.build_teacher`). It is frozen here.
            in_features: distilled levels; None or empty: every backbone level the teacher's
                heads read (a level they do not read could not learn from the task loss).
            num_tokens: tokens per level.
            weighted: whether to learn mask-weight heads.
            dice_weight: weight of the Dice diversity loss.
            area_weight: weight of ``loss_area``, the mask-area prior: the mean of the combined
                mask ``sum_t w_t M_t`` over images and cells, summed over levels (not part of
                the paper's objective; 0: off, the paper). It makes keeping a cell cost
                something, so that the tokens keep only what the teacher's loss needs.
            teacher_from_checkpoint: the teacher's weights are not loaded yet but come with the
                checkpoint to be loaded (evaluation of a stage-1 checkpoint): its fingerprint is
                then taken from that checkpoint instead of checked against it.
            input_format: the channel order of the batch ("BGR", "RGB"; ``INPUT.FORMAT``);
                None: the teacher's. A teacher that reads the other of RGB/BGR gets the batch
                converted (:mod:`maskd.modeling.pairing`), in training and in evaluation.
            mask_norm, weight_floor: the tokens' form (:class:`maskd.ReceptiveTokens`):
                "sigmoid" masks (the paper) or "softmax" over the tokens; a floor eps on the
                token weights (eps / T each at least; 0: the paper).
            fill: what masked-out cells become (:func:`maskd.modeling.losses.neutral_fill`): "zeros"
                (the paper), "mean", "blur".
            dice_pairs: "all" (the paper) or "weighted": the Dice loss over pairs weighted by
                ``w_i w_j`` (:func:`maskd.modeling.losses.dice_diversity_loss`).
            min_token_area: a > 0 adds ``loss_token_area``, ``dice_weight`` times
                :func:`maskd.modeling.losses.min_token_area_loss` summed over levels (0: off).
            weight_gate: "absolute" (the paper: ``sum_t w_t M_t`` scales the features),
                "relative" (``sum_t (w_t / max_s w_s) M_t``) or "union" (``1 - prod_t (1 -
                M_t)``, the weights left out; :class:`TokenMaskedBackbone`).
            saliency_weight: the weight of ``loss_saliency`` (0: off, the paper): the KL
                divergence of stage 2's loss over the cells from the teacher's saliency
                (:func:`maskd.modeling.losses.saliency_cell_loss`; the saliency of a cell is
                ``|d task loss / d c|``, c what the teacher sees of it), summed over levels;
                it trains masks and weights. Weighted tokens then start from equal weights
                (the weight heads' last layer at zero): the paper's initialisation gives
                nearly one-hot weights, far from any saliency.
        """
        super().__init__()
        _check_objective(
            num_tokens,
            weighted,
            dice_weight,
            area_weight,
            dice_pairs,
            min_token_area,
            weight_gate,
            saliency_weight,
        )
        freeze(teacher)
        device = next(teacher.parameters()).device  # the tokens live with the teacher
        for key, digest in _teacher_digests(teacher, teacher_from_checkpoint).items():
            self.register_buffer(key, digest.to(device))
        self.teacher_from_checkpoint = teacher_from_checkpoint
        # the backbone's levels, and the semantic head's logits where they are asked for
        shapes = point_shapes(teacher, with_logits=LOGITS in (in_features or ()))
        read = head_levels(teacher) + [LOGITS] * (LOGITS in shapes)
        levels = resolve_in_features(in_features, {"teacher": read})
        tokens = build_level_tokens(
            {lv: shapes[lv].channels for lv in levels},
            num_tokens,
            weighted,
            mask_norm,
            weight_floor,
        ).to(device)
        if saliency_weight > 0 and weighted:  # equal weights first: far from none
            for rt in tokens.values():
                nn.init.zeros_(rt.weight_head[2].weight)
                nn.init.zeros_(rt.weight_head[2].bias)
        self.input_format, self.teacher_format = resolve_channel_orders(input_format, teacher)
        # The wrapper is built here, once, and is part of the module tree: no hooks.
        elsewhere = (LOGITS,) if LOGITS in levels else ()
        teacher.backbone = TokenMaskedBackbone(
            teacher.backbone, tokens, fill, weight_gate, elsewhere
        )
        if LOGITS in levels:  # the head's own loss on masked logits
            head = teacher.sem_seg_head
            head.predictor = TokenMaskedPredictor(head.predictor, tokens[LOGITS], fill, weight_gate)
        self.teacher = teacher
        self.in_features = levels
        self.dice_weight = dice_weight
        self.area_weight = area_weight
        self.dice_pairs = dice_pairs
        self.min_token_area = min_token_area
        self.saliency_weight = saliency_weight
        self.strides = {lv: shapes[lv].stride for lv in levels}
        logger.info(
            "MasKDTokenLearner: %d tokens (weighted=%s, %s) on levels %s; fill %s, %s weight "
            "gate, saliency fit %s, Dice over %s pairs, minimum token area %s",
            num_tokens,
            weighted,
            tokens[levels[0]].describe_form(),
            levels,
            fill,
            weight_gate,
            saliency_weight or "off",
            dice_pairs,
            min_token_area or "off",
        )

    @classmethod
    def from_config(cls, cfg, load_teacher: bool = True):
        """Builds the teacher from ``MODEL.MASKD.TEACHER``, with its weights loaded unless
        ``load_teacher`` is False (``MasKDTokenLearner(cfg, load_teacher=False)``: for the
        evaluation of a stage-1 checkpoint, which holds the teacher)."""
        mcfg = cfg.MODEL.MASKD
        return {
            "teacher": teacher_from_config(cfg, load=load_teacher),
            "in_features": list(mcfg.IN_FEATURES),
            "num_tokens": mcfg.NUM_TOKENS,
            "weighted": mcfg.WEIGHTED,
            "dice_weight": mcfg.DICE_WEIGHT,
            "area_weight": mcfg.AREA_WEIGHT,
            "teacher_from_checkpoint": not load_teacher,
            "input_format": cfg.INPUT.FORMAT,
            "mask_norm": mcfg.MASK_NORM,
            "weight_floor": mcfg.WEIGHT_FLOOR,
            "fill": mcfg.FILL,
            "dice_pairs": mcfg.DICE_PAIRS,
            "min_token_area": mcfg.MIN_TOKEN_AREA,
            "weight_gate": mcfg.WEIGHT_GATE,
            "saliency_weight": mcfg.SALIENCY_WEIGHT,
        }

    @classmethod
    def build_inference_model(cls, cfg) -> nn.Module:
        """The model that evaluates a stage-1 checkpoint (``--eval-only``): the masked teacher,
        its weights not read from ``MODEL.MASKD.TEACHER.WEIGHTS`` (the checkpoint holds teacher
        and tokens)."""
        return cls(cfg, load_teacher=False).to(torch.device(cfg.MODEL.DEVICE))

    @classmethod
    def lazy_inference_node(cls, node):
        """:meth:`build_inference_model` for a LazyConfig ``model`` node: the teacher's builder
        told not to load its weights, where it takes ``load`` (:func:`maskd.build_teacher`)."""
        target = node.teacher.get("_target_") if isinstance(node.teacher, DictConfig) else None
        if isinstance(target, str):
            target = locate(target)
        try:
            takes_load = "load" in inspect.signature(target).parameters
        except (TypeError, ValueError):
            takes_load = False
        if takes_load:
            node.teacher.load = False
        return node

    @property
    def tokens(self) -> nn.ModuleDict:
        return self.teacher.backbone.tokens

    @property
    def device(self) -> torch.device:
        return self.tokens[self.in_features[0]].tokens.device

    def train(self, mode: bool = True):
        """Set the training mode; the teacher stays in eval mode (see :func:`task_loss_mode`)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def token_losses(
        self,
        masks: Dict[str, LevelMasks],
        saliency: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """The tokens' own losses of one step, from the masks the backbone wrapper made.

        Args:
            masks: level -> :class:`maskd.modeling.backbone.LevelMasks` (with gradient).
            saliency: level -> (N, H, W) saliency of the cells, where stage 2's loss is fitted
                to it (``saliency_weight`` > 0).

        Returns:
            ``loss_dice`` (``dice_weight`` x the Dice diversity loss, summed over levels), and
            where enabled ``loss_token_area``, ``loss_area`` and ``loss_saliency``.

        Raises:
            FloatingPointError: a non-finite per-level Dice loss, naming the level.
        """
        storage = get_event_storage()
        dice = {
            lv: dice_diversity_loss(
                m.masks, weights=m.weights if self.dice_pairs == "weighted" else None
            )
            for lv, m in masks.items()
        }
        raise_if_not_finite(dice, "loss_dice (per level)", storage.iter)
        out = {"loss_dice": self.dice_weight * sum(dice.values())}
        if self.min_token_area > 0:
            out["loss_token_area"] = self.dice_weight * sum(
                min_token_area_loss(m.masks, self.min_token_area) for m in masks.values()
            )
        if self.area_weight > 0:  # the mean of the combined mask, padding included
            out["loss_area"] = self.area_weight * sum(
                m.combined.float().mean() for m in masks.values()
            )
        if saliency is not None:
            out["loss_saliency"] = self.saliency_weight * sum(
                saliency_cell_loss(m.masks, m.weights, saliency[lv]) for lv, m in masks.items()
            )
        return out

    def saliency(
        self, task_losses: Dict[str, torch.Tensor], masks: Dict[str, LevelMasks]
    ) -> Dict[str, torch.Tensor]:
        """How much the teacher's task loss depends on each cell: level -> (N, H, W)
        ``|d task loss / d c|``, c what the teacher sees of the cell (the combined mask), without
        gradient; a level the loss does not reach has zeros."""
        levels = list(masks)
        total = sum(task_losses.values())
        grads = torch.autograd.grad(
            total, [masks[lv].combined for lv in levels], retain_graph=True, allow_unused=True
        )
        return {
            lv: torch.zeros_like(masks[lv].combined) if g is None else g.detach().abs()
            for lv, g in zip(levels, grads)
        }

    @contextlib.contextmanager
    def masks_disabled(self):
        """Inside this block the model evaluates as the plain teacher: its backbone's features
        reach the heads unmasked (the retention of stage 1 compares both). For inference only:
        a training step inside it fails, as it makes no masks to learn from."""
        wrappers = [self.teacher.backbone]
        if LOGITS in self.in_features:
            wrappers.append(self.teacher.sem_seg_head.predictor)
        for wrapper in wrappers:
            wrapper.masking = False
        try:
            yield self
        finally:
            for wrapper in wrappers:
                wrapper.masking = True

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs: a list of dicts, as detectron2's DatasetMapper produces them.

        Returns:
            training: dict of scalar losses: the teacher's task losses and those of
                :meth:`token_losses` (``loss_dice``; ``loss_token_area``, ``loss_area`` where on);
                the token statistics of every level (:mod:`maskd.modeling.diagnostics`) go to the
                event storage.
            inference: the teacher's outputs on masked features, one dict per image.
        """
        batched_inputs = teacher_batch(
            batched_inputs, self.input_format, self.teacher_format, self.teacher
        )
        if not self.training:
            return self.teacher(batched_inputs)
        backbone = self.teacher.backbone
        with task_loss_mode(self.teacher), recording(self.teacher):
            losses = self.teacher(batched_inputs)
            masks, padded = dict(backbone.recorded("masks")), backbone.recorded("input_hw")
            if LOGITS in self.in_features:
                masks.update(self.teacher.sem_seg_head.predictor.recorded("masks"))
        storage = get_event_storage()
        raise_if_not_finite(losses, "the teacher's task losses on masked features", storage.iter)
        saliency = self.saliency(losses, masks) if self.saliency_weight > 0 else None
        ours = self.token_losses(masks, saliency)
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        levels = {
            lv: (
                m.masks.detach(),
                None if m.weights is None else m.weights.detach(),
                level_sizes(image_sizes, padded, m.masks.shape[-2:]),
            )
            for lv, m in masks.items()
        }
        views = {lv: m.combined.detach() for lv, m in masks.items()}
        put_level_statistics(storage, levels, batched_inputs, self.strides, views)
        clash = sorted(set(ours) & set(losses))
        if clash:
            raise KeyError(f"the teacher already returns losses named {clash}")
        losses.update(ours)
        return losses
