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
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from .logits import LOGITS, point_shapes

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
    "resolve_in_features",
]

logger = logging.getLogger(__name__)

# --- the batch each model sees: channel order, padding, the image area of a level ---------


# The channel orders one can convert into each other by reversing the channel axis.
CHANNEL_ORDERS = ("RGB", "BGR")


def check_channel_orders(data_format: Optional[str], model_format: Optional[str], who: str) -> bool:
    """Whether images of ``data_format`` must be converted for a model that reads
    ``model_format``.

    Args:
        data_format: the channel order of the batch (``INPUT.FORMAT`` of the run).
        model_format: the model's ``input_format`` (None: not declared).
        who: "the teacher" / "the student", for messages.

    Raises:
        ValueError: the two differ and are not both RGB/BGR (e.g. "L" or "YUV-BT.601").
    """
    if not data_format or not model_format or data_format == model_format:
        return False
    if data_format in CHANNEL_ORDERS and model_format in CHANNEL_ORDERS:
        return True
    raise ValueError(
        f"{who} reads {model_format} images but the data are {data_format}: MasKD converts only "
        f"between {' and '.join(CHANNEL_ORDERS)}; load the data in {model_format}"
    )


def to_channel_order(batched_inputs: Sequence[dict], src: str, dst: str) -> List[dict]:
    """The batch with every ``image`` (C, H, W) in channel order ``dst`` (shallow copies of the
    dicts; the other entries are shared). ``src == dst`` returns the inputs as they are."""
    if src == dst:
        return list(batched_inputs)
    check_channel_orders(src, dst, "the model")
    return [{**x, "image": x["image"].flip(0)} for x in batched_inputs]


def padding_of(model: nn.Module) -> Tuple[int, Tuple[Tuple[str, int], ...]]:
    """How a meta-architecture pads its batch: (backbone ``size_divisibility``, sorted
    ``padding_constraints`` items). Two models with equal values pad every batch alike."""
    backbone = model.backbone
    constraints = getattr(backbone, "padding_constraints", None) or {}
    return int(backbone.size_divisibility), tuple(sorted(constraints.items()))


def check_square_pad(model: nn.Module, image_sizes: Sequence[Tuple[int, int]], who: str) -> None:
    """Fail if an image is larger than the square a model pads to (``square_size`` of its
    backbone's ``padding_constraints``): detectron2's ImageList would cut it silently.

    Args:
        image_sizes: N (h, w) sizes of the images before padding.
    """
    square = (getattr(model.backbone, "padding_constraints", None) or {}).get("square_size", 0)
    if square <= 0:
        return
    for h, w in image_sizes:
        if h > square or w > square:
            raise ValueError(
                f"an image of {h}x{w} pixels is larger than the {square}x{square} square that "
                f"{who} pads to (its backbone's padding_constraints['square_size']): it would be "
                "cut. Resize the data to at most that size (e.g. ResizeShortestEdge with "
                f"max_size={square}, or an LSJ crop of {square})"
            )


def teacher_batch(
    batched_inputs: Sequence[dict],
    data_format: Optional[str],
    teacher_format: Optional[str],
    teacher: Optional[nn.Module] = None,
) -> List[dict]:
    """The batch as a teacher reads it (both stages and the mask drawings).

    Args:
        batched_inputs: dicts with (C, H, W) ``image`` in ``data_format``.
        data_format: the batch's channel order.
        teacher_format: the teacher's, if it must be converted to (None: it reads the batch as
            it is; see :func:`check_channel_orders`).
        teacher: if given, every image is checked against the square it pads to
            (:func:`check_square_pad`).

    Returns:
        the batch in the teacher's channel order (a shallow copy when converted).
    """
    if teacher_format:
        batched_inputs = to_channel_order(batched_inputs, data_format, teacher_format)
    if teacher is not None:
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        check_square_pad(teacher, sizes, "the teacher")
    return list(batched_inputs)


def image_area(
    teacher: torch.Tensor,
    student: torch.Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    stride: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
    """Cut one level's teacher and student features to their common top-left grid and mark the
    cells over the image area.

    Both models see the same images at the same resolution, only padded differently at the
    bottom and right, so cell (i, j) of a level of stride ``s`` covers the same pixels
    ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` in both; a cell belongs to the image area of an h x w
    image if ``i < ceil(h / s)`` and ``j < ceil(w / s)``.

    Args:
        teacher: (N, C_t, H_t, W_t) teacher features.
        student: (N, C_s, H_s, W_s) student features.
        image_sizes: N (h, w) image sizes before padding.
        stride: the level's stride in both models.

    Returns:
        (N, C_t, H, W) teacher and (N, C_s, H, W) student features (views) with H = min(H_t,
        H_s), W = min(W_t, W_s); the (N, 1, H, W) 0/1 mask of the image area (teacher dtype);
        the N (h_l, w_l) sizes of the image area at this level.

    Raises:
        ValueError: the batch sizes differ, or an image reaches beyond the common grid.
    """
    if teacher.shape[0] != student.shape[0] or teacher.shape[0] != len(image_sizes):
        raise ValueError(
            f"teacher features {tuple(teacher.shape)}, student features {tuple(student.shape)} "
            f"and {len(image_sizes)} images: the batch sizes differ"
        )
    height = min(teacher.shape[2], student.shape[2])
    width = min(teacher.shape[3], student.shape[3])
    sizes = [(math.ceil(h / stride), math.ceil(w / stride)) for h, w in image_sizes]
    for (h, w), (hl, wl) in zip(image_sizes, sizes):
        if hl > height or wl > width:
            raise ValueError(
                f"an image of {h}x{w} pixels covers {hl}x{wl} cells at stride {stride}, but the "
                f"teacher's features are {tuple(teacher.shape[2:])} and the student's "
                f"{tuple(student.shape[2:])}: the models do not see the same images"
            )
    rows = torch.arange(height, device=teacher.device)
    cols = torch.arange(width, device=teacher.device)
    limits = torch.tensor(sizes, device=teacher.device)  # (N, 2)
    valid = (rows[None, :, None] < limits[:, 0, None, None]) & (
        cols[None, None, :] < limits[:, 1, None, None]
    )  # (N, H, W)
    valid = valid[:, None].to(teacher.dtype)
    return teacher[:, :, :height, :width], student[:, :, :height, :width], valid, sizes


def resolve_channel_orders(
    input_format: Optional[str], teacher: nn.Module, student: Optional[nn.Module] = None
) -> Tuple[Optional[str], Optional[str]]:
    """The batch's channel order and the one the teacher must get, for both stages.

    Args:
        input_format: ``INPUT.FORMAT`` of the run, or None: the student's ``input_format``
            (stage 2), else the teacher's.
        teacher: the teacher meta-architecture (its ``input_format``, if declared).
        student: the student (stage 2), which must read the batch as it is loaded.

    Returns:
        (the batch's channel order, the teacher's order if the batch must be converted for
        it, else None).

    Raises:
        ValueError: the student reads another order than the data's, or the teacher's order
            cannot be converted to (:func:`check_channel_orders`).
    """
    s_format = getattr(student, "input_format", None) if student is not None else None
    t_format = getattr(teacher, "input_format", None)
    input_format = input_format or s_format
    if s_format and input_format and s_format != input_format:
        raise ValueError(
            f"the student reads {s_format} images but the data are {input_format} "
            "(INPUT.FORMAT): the student is trained on the data as they are loaded"
        )
    if not input_format:
        if student is not None:
            logger.warning(
                "neither input_format nor the student's input_format is set: assuming the data "
                "are in the teacher's channel order (%s)",
                t_format,
            )
        input_format = t_format
    convert = t_format if check_channel_orders(input_format, t_format, "the teacher") else None
    if not t_format and input_format and student is not None:
        logger.warning(
            "the teacher declares no input_format: assuming it reads the data's channel order "
            "(%s)",
            input_format,
        )
    if convert:
        logger.info("the %s batch is converted to %s for the teacher", input_format, convert)
    return input_format, convert


# --- which levels pair, and the pairing of two models --------------------------------------


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
    logits = LOGITS in token_channels  # the semantic heads' outputs, where tokens are for them
    t_shapes = point_shapes(teacher, with_logits=logits)
    s_shapes = point_shapes(student, with_logits=logits)
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
    if LOGITS in pairs and t_shapes[LOGITS].channels != s_shapes[pairs[LOGITS]].channels:
        raise ValueError(
            f"level '{LOGITS}' compares class scores, but the teacher predicts "
            f"{t_shapes[LOGITS].channels} classes and the student "
            f"{s_shapes[pairs[LOGITS]].channels}: both must predict the same classes"
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


def resolve_in_features(
    requested: Optional[List[str]],
    available: Dict[str, List[str]],
    what: str = "MODEL.MASKD.IN_FEATURES",
) -> List[str]:
    """The distilled levels: ``requested``, or every level all models produce.

    Args:
        requested: level names, or None / empty for the default.
        available: model name ("teacher", "student") -> the levels it offers (the student's
            backbone outputs; the backbone levels the teacher's heads read), the first model's
            order being the default order.

    Raises:
        ValueError: naming the level and the model that lacks it.
    """
    names = list(available)
    if requested:
        for level in requested:
            for who in names:
                if level not in available[who]:
                    raise ValueError(
                        f"{what} names level '{level}', but the {who} "
                        f"offers only {available[who]}"
                    )
        return list(requested)
    common = [lv for lv in available[names[0]] if all(lv in available[w] for w in names)]
    if not common:
        raise ValueError(
            "no feature level is produced by all of "
            + ", ".join(f"the {w} ({available[w]})" for w in names)
        )
    return common
