"""Heterogeneous teacher-student pairs: what is aligned between two models, and how.

A teacher may differ from its student in

- **channel order** (``input_format``: a ViTDet or Swin teacher reads RGB, detectron2's
  caffe-style ResNets BGR): the batch is handed to each model in its own order
  (:func:`to_channel_order`); normalisation (pixel mean/std) is each model's own already, as
  each one's ``preprocess_image`` applies it;
- **padding** (ViTDet pads to a 1024 square, FPN to a multiple of 32): the two feature maps of
  a level are cut to their common top-left grid and only the cells over the image area enter the
  loss and the masks (:func:`image_area`);
- **level names and strides**: a teacher level is distilled into the student level of the same
  name, or the one ``LEVEL_MAP`` names, if both have the same stride (:func:`pair_levels`);
- **channels**: the 1x1 align conv of each level maps student to teacher channels.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.layers import ShapeSpec
from torch import nn

from .batch_alignment import (
    CHANNEL_ORDERS,
    check_channel_orders,
    check_square_pad,
    image_area,
    padding_of,
    resolve_channel_orders,
    teacher_batch,
    to_channel_order,
)

__all__ = [
    "CHANNEL_ORDERS",
    "check_channel_orders",
    "to_channel_order",
    "padding_of",
    "check_square_pad",
    "teacher_batch",
    "parse_level_map",
    "pair_levels",
    "image_area",
    "resolve_channel_orders",
    "Pairing",
    "resolve_pair",
]

logger = logging.getLogger(__name__)


def parse_level_map(entries: Sequence[str]) -> Dict[str, str]:
    """``MODEL.MASKD.LEVEL_MAP`` entries ``"TEACHER_LEVEL:STUDENT_LEVEL"`` -> dict.

    Raises:
        ValueError: an entry of another form, or a teacher level named twice.
    """
    out: Dict[str, str] = {}
    for entry in entries:
        parts = str(entry).split(":")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(
                f"MODEL.MASKD.LEVEL_MAP entry '{entry}': expected 'TEACHER_LEVEL:STUDENT_LEVEL', "
                "e.g. 'p4:res4'"
            )
        t, s = (p.strip() for p in parts)
        if t in out:
            raise ValueError(f"MODEL.MASKD.LEVEL_MAP names teacher level '{t}' twice")
        out[t] = s
    return out


def _describe(shapes: Mapping[str, ShapeSpec]) -> str:
    return "{" + ", ".join(f"{k}: stride {v.stride}" for k, v in shapes.items()) + "}"


def pair_levels(
    teacher: Mapping[str, ShapeSpec],
    student: Mapping[str, ShapeSpec],
    levels: Sequence[str],
    level_map: Optional[Mapping[str, str]] = None,
    explicit: bool = False,
) -> Dict[str, str]:
    """Which student level each distilled teacher level is aligned with.

    Teacher level ``t`` goes with student level ``level_map.get(t, t)`` when the student has it at
    the same stride. Levels without such a partner are an error if they were asked for
    (``explicit``, or named in ``level_map``) and otherwise left out (logged).

    Args:
        teacher: the teacher's backbone output shapes (level -> ShapeSpec with ``stride``).
        student: the student's backbone output shapes.
        levels: the candidate teacher levels, in distillation order (the tokens' levels, or
            ``IN_FEATURES``).
        level_map: teacher level -> student level, for levels named differently.
        explicit: ``levels`` were named by the user: every one must be paired.

    Returns:
        teacher level -> student level, in the order of ``levels``.

    Raises:
        ValueError: naming the levels and strides of both models, if a requested level cannot
            be aligned, ``level_map`` names a level a model lacks, or nothing can be aligned.
    """
    level_map = dict(level_map or {})
    both = f"teacher levels {_describe(teacher)}, student levels {_describe(student)}"
    for t, s in level_map.items():
        if t not in teacher or s not in student:
            missing = f"the teacher has no level '{t}'" if t not in teacher else ""
            missing = missing or f"the student has no level '{s}'"
            raise ValueError(f"MODEL.MASKD.LEVEL_MAP maps '{t}' to '{s}', but {missing} ({both})")
    pairs: Dict[str, str] = {}
    left_out: List[str] = []
    for t in levels:
        if t not in teacher:
            raise ValueError(f"level '{t}' is not produced by the teacher ({both})")
        s = level_map.get(t, t)
        if s in student and student[s].stride == teacher[t].stride:
            pairs[t] = s
            continue
        if s not in student:
            why = f"the student has no level '{s}'"
        else:
            why = (
                f"the student's level '{s}' has stride {student[s].stride}, the teacher's "
                f"'{t}' stride {teacher[t].stride}"
            )
        if explicit or t in level_map:
            raise ValueError(
                f"teacher level '{t}' cannot be aligned with the student: {why} ({both}); "
                "distil levels of the same stride, naming differently named ones in "
                "MODEL.MASKD.LEVEL_MAP ('TEACHER_LEVEL:STUDENT_LEVEL')"
            )
        left_out.append(f"'{t}' ({why})")
    if not pairs:
        raise ValueError(
            f"no feature level of the teacher can be aligned with one of the student ({both}): "
            "levels are aligned by name at equal stride; map differently named levels of the "
            "same stride with MODEL.MASKD.LEVEL_MAP ('TEACHER_LEVEL:STUDENT_LEVEL')"
        )
    if left_out:
        logger.warning("teacher levels not distilled: %s", "; ".join(left_out))
    return pairs


@dataclass
class Pairing:
    """How a teacher and a student are aligned in stage 2 (:func:`resolve_pair`).

    Attributes:
        levels: the distilled teacher levels, in order.
        student_levels: teacher level -> the student level aligned with it.
        strides: teacher level -> stride.
        channels: teacher level -> (student channels, teacher channels).
        input_format: the batch's channel order.
        teacher_format: the teacher's, if the batch is converted for it (else None).
        image_area_only: whether loss and masks cover the image area only.
    """

    levels: List[str]
    student_levels: Dict[str, str]
    strides: Dict[str, int]
    channels: Dict[str, Tuple[int, int]]
    input_format: Optional[str]
    teacher_format: Optional[str]
    image_area_only: bool


def resolve_pair(
    teacher: nn.Module,
    student: nn.Module,
    token_channels: Mapping[str, int],
    read: Sequence[str],
    *,
    in_features: Optional[Sequence[str]] = None,
    level_map: Optional[Mapping[str, str]] = None,
    input_format: Optional[str] = None,
    image_area_only: bool = False,
    source: Optional[str] = None,
) -> Pairing:
    """Every decision of how a teacher distils into a student: levels, channel orders, padding.

    Args:
        teacher, student: the two meta-architectures (with ``backbone``).
        token_channels: level -> channels of the receptive tokens (the tokens' levels).
        read: the backbone levels the teacher's heads read.
        in_features: the teacher levels to distil (each must be aligned); None or empty: every
            level of the tokens that can be aligned with a student level.
        level_map: teacher level -> student level for levels named differently.
        input_format: see :func:`resolve_channel_orders`.
        image_area_only: loss and masks over the image area only (always so when the two
            models pad differently).
        source: where the tokens come from, for messages.

    Raises:
        ValueError: naming the levels, channels or formats that do not fit.
    """
    t_shapes = teacher.backbone.output_shape()
    s_shapes = student.backbone.output_shape()
    if in_features:
        missing = [lv for lv in in_features if lv not in token_channels]
        if missing:
            raise ValueError(
                f"MODEL.MASKD.IN_FEATURES names levels {missing}, but the receptive tokens "
                f"are for levels {list(token_channels)}"
            )
    candidates = (
        list(in_features)
        if in_features
        else [lv for lv in read if lv in token_channels]
        + [lv for lv in token_channels if lv not in read]
    )
    unread = [lv for lv in candidates if lv not in read]
    if unread:
        raise ValueError(
            f"receptive tokens for levels {unread}, which the teacher's heads do not read "
            f"(they read {list(read)}): were the tokens learned on another teacher?"
        )
    pairs = pair_levels(
        {lv: t_shapes[lv] for lv in read},
        s_shapes,
        candidates,
        level_map,
        explicit=bool(in_features),
    )
    for lv in pairs:
        if token_channels[lv] != t_shapes[lv].channels:
            raise ValueError(
                f"the receptive tokens of level '{lv}'"
                + (f" in '{source}'" if source else "")
                + f" have {token_channels[lv]} channels, "
                f"the teacher's '{lv}' features {t_shapes[lv].channels}: were the tokens "
                "learned on another teacher?"
            )
    input_format, teacher_format = resolve_channel_orders(input_format, teacher, student)
    forced = padding_of(teacher) != padding_of(student)
    return Pairing(
        levels=list(pairs),
        student_levels=pairs,
        strides={lv: t_shapes[lv].stride for lv in pairs},
        channels={lv: (s_shapes[pairs[lv]].channels, t_shapes[lv].channels) for lv in pairs},
        input_format=input_format,
        teacher_format=teacher_format,
        image_area_only=bool(image_area_only or forced),
    )
