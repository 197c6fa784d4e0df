"""The batch each model of a heterogeneous pair sees: channel order (RGB/BGR), padding, and the
image area of each level's feature maps (:mod:`maskd.pairing` decides; this module does)."""

import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "CHANNEL_ORDERS",
    "check_channel_orders",
    "to_channel_order",
    "padding_of",
    "check_square_pad",
    "teacher_batch",
    "image_area",
    "resolve_channel_orders",
]

logger = logging.getLogger(__name__)


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
