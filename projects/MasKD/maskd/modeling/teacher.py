"""Build, load and freeze a teacher."""

import logging
from typing import List, Sequence

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

from ..checkpoint import load_weights_strict
from ..config import load_config, resolve_config_file

__all__ = [
    "build_teacher",
    "teacher_from_config",
    "load_weights_strict",
    "freeze",
    "preprocess_images",
    "head_levels",
]

logger = logging.getLogger(__name__)


def build_teacher(
    config_file: str,
    opts: Sequence[str] = (),
    device: str = "cpu",
    *,
    weights: str = "",
    allow_random_init: bool = False,
    load: bool = True,
    what: str = "MODEL.MASKD.TEACHER.WEIGHTS",
) -> nn.Module:
    """Build a teacher from its config, load its trained weights strictly and freeze it.

    Args:
        config_file: a yacs .yaml or LazyConfig .py path, or a model-zoo name.
        opts: overrides (yacs: ["KEY", "VALUE", ...]; LazyConfig: ["key=value", ...]).
        device: where to put it.
        weights: its checkpoint (any format detectron2 reads); required unless
            ``allow_random_init`` or not ``load``.
        allow_random_init: accept an empty ``weights`` (tests and smoke runs only).
        load: False to build without reading ``weights``, when the caller loads a checkpoint
            that holds the teacher (evaluation of a stage-1 checkpoint).
        what: the config key naming the weights, for messages.

    Returns:
        the teacher meta-architecture, frozen (``requires_grad`` off, eval mode).

    Raises:
        ValueError: ``weights`` is empty (without ``allow_random_init``) or does not fit.
        FileNotFoundError: the config or the weights do not exist.
    """
    path = resolve_config_file(config_file)
    cfg = load_config(path)
    _apply_overrides(cfg, list(opts), path)
    _refuse_a_maskd_config(cfg, path)
    if isinstance(cfg, CfgNode):
        cfg.MODEL.DEVICE = device
        model = build_model(cfg)
        fmt = cfg.INPUT.FORMAT
    else:
        model = instantiate(cfg.model).to(device)
        fmt = _lazy_image_format(cfg)
    if getattr(model, "input_format", None) is None and fmt:
        # models without the attribute (FCOS, semantic FPN): what its config feeds it, so that
        # MasKD can check the student's data against it
        model.input_format = fmt
    if load and weights:
        load_weights_strict(model, weights, what)
    elif load and allow_random_init:
        logger.warning("%s is empty: the teacher keeps its random initialisation", what)
    elif load:
        raise ValueError(
            f"{what} is empty: a teacher needs trained weights (set it to the teacher's "
            "checkpoint; only smoke tests set MODEL.MASKD.TEACHER.ALLOW_RANDOM_INIT)"
        )
    return freeze(model)


def _apply_overrides(cfg, opts: List[str], path: str) -> None:
    """The teacher's overrides (``MODEL.MASKD.TEACHER.OPTS``) applied to its config, errors
    naming the key and the teacher config."""
    what = f"MODEL.MASKD.TEACHER.OPTS (overrides of the teacher config '{path}')"
    if isinstance(cfg, CfgNode):
        if len(opts) % 2:
            raise ValueError(f"{what} must be KEY VALUE pairs; got an odd number of items: {opts}")
        try:
            cfg.merge_from_list(opts)
        except (KeyError, AssertionError, ValueError, TypeError) as e:
            raise ValueError(f"{what}: {e.args[0] if e.args else e}") from None
        return
    bad = [o for o in opts if "=" not in o]
    if bad:
        raise ValueError(f"{what}: LazyConfig overrides are key=value, got {bad}")
    try:
        LazyConfig.apply_overrides(cfg, opts)
    except Exception as e:  # omegaconf's errors
        raise ValueError(f"{what}: {type(e).__name__}: {e}") from None


# the registered names of the two MasKD meta-architectures (neither a teacher nor a student)
MASKD_ARCHITECTURES = ("MasKD", "MasKDTokenLearner")


def _refuse_a_maskd_config(cfg, path: str) -> None:
    """A teacher config must build the teacher itself, not a MasKD model (whose own teacher
    config could name this file again, without end)."""
    if isinstance(cfg, CfgNode):
        arch = cfg.MODEL.META_ARCHITECTURE
    else:
        target = cfg.get("model", {}).get("_target_", "")
        arch = str(getattr(target, "__name__", target)).split(".")[-1]
    if arch in MASKD_ARCHITECTURES:
        raise ValueError(
            f"the teacher config '{path}' (MODEL.MASKD.TEACHER.CONFIG_FILE) is a MasKD config "
            f"({arch}); name the teacher's own detectron2 config, the one it was trained with"
        )


def teacher_from_config(cfg, load: bool = True) -> nn.Module:
    """:func:`build_teacher` from a MasKD yacs config's ``MODEL.MASKD.TEACHER`` keys (both
    stages' ``from_config``), on ``MODEL.DEVICE``."""
    t = cfg.MODEL.MASKD.TEACHER
    return build_teacher(
        t.CONFIG_FILE,
        t.OPTS,
        cfg.MODEL.DEVICE,
        weights=t.WEIGHTS,
        allow_random_init=t.ALLOW_RANDOM_INIT,
        load=load,
    )


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` on every parameter and eval mode; returns the module."""
    module.requires_grad_(False)
    module.eval()
    return module


def preprocess_images(model: nn.Module, batched_inputs) -> ImageList:
    """The normalised, padded images a meta-architecture's backbone sees.

    Uses ``model.preprocess_image`` where it exists (R-CNN, RetinaNet, FCOS, Panoptic FPN) and
    the same steps as ``SemanticSegmentor.forward`` otherwise.
    """
    if hasattr(model, "preprocess_image"):
        return model.preprocess_image(batched_inputs)
    device = model.pixel_mean.device
    images = [(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in batched_inputs]
    return ImageList.from_tensors(
        images,
        model.backbone.size_divisibility,
        padding_constraints=model.backbone.padding_constraints,
    )


# Attributes through which detectron2's heads name the feature levels they read.
_LEVEL_ATTRS = (
    "in_features",
    "head_in_features",
    "box_in_features",
    "mask_in_features",
    "keypoint_in_features",
)


def head_levels(model: nn.Module) -> List[str]:
    """The backbone levels a meta-architecture's heads read, in the backbone's order.

    Collected from the ``in_features``-style attributes of the model and its non-backbone
    submodules (RPN, ROI heads, RetinaNet/FCOS heads, semantic heads); all backbone levels if
    none is found.
    """
    produced = list(model.backbone.output_shape())
    used = set()
    backbone_modules = {id(m) for m in model.backbone.modules()}
    for module in model.modules():
        if id(module) in backbone_modules:
            continue
        for attr in _LEVEL_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                used.update(value)
    levels = [lv for lv in produced if lv in used]
    return levels or produced


def thing_classes(model: nn.Module):
    """The number of object classes a detector predicts (R-CNN ROI heads, RetinaNet, FCOS), or
    None for a model without one (semantic segmentation, whose classes include stuff)."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None and hasattr(roi, "num_classes"):
        return int(roi.num_classes)
    if hasattr(model, "head") and hasattr(model, "num_classes"):
        return int(model.num_classes)
    return None


def _lazy_image_format(cfg):
    """``dataloader.train.mapper.image_format`` of a LazyConfig, if it has one."""
    try:
        return cfg.dataloader.train.mapper.image_format
    except (AttributeError, KeyError):
        return None
