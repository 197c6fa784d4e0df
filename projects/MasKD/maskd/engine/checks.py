"""Checks that run when a training or evaluation starts, before any long work."""

from typing import Iterable

import torch
from detectron2.data import MetadataCatalog

from ..checkpoint.format import STAGE1, STAGE2, model_stage
from ..modeling.teacher import thing_classes
from .ddp import unwrap

__all__ = ["check_class_counts", "check_input_format"]


def check_class_counts(model: torch.nn.Module, dataset_names: Iterable[str]) -> None:
    """Fail, naming the numbers, if the model that learns from the training data predicts
    another number of object classes than the data has: the teacher in stage 1 (its task loss
    trains the tokens), the student in stage 2 or a plain model. Call it once the datasets are
    loaded (their metadata then has ``thing_classes``)."""
    model = unwrap(model)
    stage = model_stage(model)
    if stage == STAGE1:
        who, learner = "the teacher (stage 1 trains the tokens with its task loss)", model.teacher
    elif stage == STAGE2:
        who, learner = "the student", model.student
    else:
        who, learner = "the model", model
    predicted = thing_classes(learner)
    if predicted is None:
        return
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != predicted:
            raise ValueError(
                f"{who} predicts {predicted} classes (MODEL.ROI_HEADS.NUM_CLASSES / "
                f"MODEL.RETINANET.NUM_CLASSES, or num_classes), but the dataset '{name}' has "
                f"{len(classes)}: {list(classes)[:8]}"
            )


def check_input_format(model: torch.nn.Module, data_format: str, what: str) -> None:
    """Fail if a MasKD model was built for images of another channel order than the data this
    run loads (its ``input_format`` vs ``INPUT.FORMAT`` / the mapper's ``image_format``). The
    teacher may read another order than the data: the model converts for it
    (:mod:`maskd.modeling.pairing`), which is why the model must know the data's."""
    inner = unwrap(model)
    if getattr(inner, "teacher", None) is None:
        return
    expects = getattr(inner, "input_format", None)
    if expects and data_format and expects != data_format:
        raise ValueError(
            f"the MasKD model was built for {expects} images (its input_format), but this run "
            f"feeds {data_format} ({what}): give the model the data's channel order"
        )
