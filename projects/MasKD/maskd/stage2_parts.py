"""Builders and checks of the stage-2 model (:class:`maskd.MasKD`) that its constructor and
``from_config`` use: the student's own config, the tokens of a config, the head-level KD
checks."""

import logging
from typing import Sequence

from torch import nn

from .head_kd import HeadKD
from .pairing import padding_of
from .receptive_tokens import build_level_tokens
from .teacher import head_levels
from .token_files import tokens_from_file
from .token_learner import resolve_in_features

__all__ = ["student_config", "stage2_tokens", "check_head_kd", "log_build"]

logger = logging.getLogger(__name__)


def student_config(cfg):
    """The student's own yacs config in a stage-2 config: ``MODEL.META_ARCHITECTURE`` set to
    ``MODEL.MASKD.STUDENT_META_ARCHITECTURE`` (a copy; ``cfg`` is not changed)."""
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = cfg.MODEL.MASKD.STUDENT_META_ARCHITECTURE
    return out


def check_head_kd(
    head_kd: Sequence[HeadKD], image_area_only: bool, teacher: nn.Module, student: nn.Module
) -> None:
    """Refuse head-level KD terms that the pair cannot have: cell-by-cell terms where the two
    models pad differently (or the loss covers the image area only), or two terms of one loss
    name."""
    for term in head_kd:
        if image_area_only and term.SAME_GRID:
            raise ValueError(
                f"{term.LOSS_NAME} compares the teacher's and the student's dense head outputs "
                "cell by cell, which needs both to pad alike; teacher "
                f"{padding_of(teacher)} and student {padding_of(student)} do not, or "
                "IMAGE_AREA_ONLY is set"
            )
    names = [term.LOSS_NAME for term in head_kd]
    if len(set(names)) != len(names):
        raise ValueError(f"head-level KD terms with the same loss name: {names}")


def stage2_tokens(mcfg, teacher: nn.Module, learned: bool) -> nn.ModuleDict:
    """The tokens of a stage-2 yacs config (``MODEL.MASKD``): loaded from ``TOKENS_WEIGHTS``
    (levels and shapes from the file), or untrained on the levels the teacher's heads read where
    allowed (``ALLOW_RANDOM_TOKENS``) or where the mask source does not use learned tokens.

    Raises:
        ValueError: ``TOKENS_WEIGHTS`` is empty and neither is the case.
    """
    if mcfg.TOKENS_WEIGHTS:
        # levels and shapes from the file; the constructor keeps those it can align
        tokens = tokens_from_file(
            mcfg.TOKENS_WEIGHTS,
            mcfg.NUM_TOKENS,
            mcfg.WEIGHTED,
            "MODEL.MASKD.TOKENS_WEIGHTS",
            mask_norm=mcfg.MASK_NORM,
            weight_floor=mcfg.WEIGHT_FLOOR,
        )
    elif mcfg.ALLOW_RANDOM_TOKENS or not learned:
        if learned:
            logger.warning("MODEL.MASKD.TOKENS_WEIGHTS is empty: distilling with random tokens")
        t_shapes = teacher.backbone.output_shape()
        levels = resolve_in_features(list(mcfg.IN_FEATURES), {"teacher": head_levels(teacher)})
        tokens = build_level_tokens(
            {lv: t_shapes[lv].channels for lv in levels},
            mcfg.NUM_TOKENS,
            mcfg.WEIGHTED,
            mcfg.MASK_NORM,
            mcfg.WEIGHT_FLOOR,
        )
    else:
        raise ValueError(
            "MODEL.MASKD.TOKENS_WEIGHTS is empty: stage 2 needs the receptive tokens learned "
            "in stage 1 (its model_final.pth, or a tokens export); set "
            "MODEL.MASKD.ALLOW_RANDOM_TOKENS only for the random-token ablation"
        )
    return tokens


def log_build(model, tokens, head_kd) -> None:
    """Log what a built stage-2 model distils, from what, and how."""
    levels = model.in_features
    logger.info(
        "MasKD: levels %s, masks from %s (%d tokens, weighted=%s), loss weight %s, "
        "customised masks from iteration %s, head-level KD: %s; teacher input: %s, loss "
        "over %s",
        ", ".join(
            (
                lv
                if model.student_levels[lv] == lv
                else f"{lv} <- student {model.student_levels[lv]}"
            )
            for lv in levels
        ),
        model.mask_source.extra_repr(),
        tokens[levels[0]].num_tokens,
        tokens[levels[0]].weighted,
        model.loss_weight,
        model.custom_mask_warmup if model.custom_mask_warmup >= 0 else "never",
        ", ".join(f"{t.LOSS_NAME} ({t.extra_repr()})" for t in head_kd) or "none",
        (
            f"converted {model.input_format} -> {model.teacher_format}"
            if model.teacher_format
            else "as loaded"
        ),
        "the image area" if model.image_area_only else "the padded batch",
    )
