"""Build, load and freeze a teacher."""

import logging
import os
from typing import List, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

from .checkpoint import read_checkpoint
from .config import MasKDCfgNode

__all__ = [
    "resolve_config_file",
    "build_teacher",
    "load_weights_strict",
    "freeze",
    "prepare_teacher",
    "preprocess_images",
    "head_levels",
]

logger = logging.getLogger(__name__)


def resolve_config_file(name_or_path: str, what: str = "MODEL.MASKD.TEACHER.CONFIG_FILE") -> str:
    """A config path: an existing file, or a detectron2 model-zoo config name.

    Raises:
        FileNotFoundError: naming ``what`` and the value, if it is neither.
    """
    if not name_or_path:
        raise FileNotFoundError(f"{what} is empty: name the teacher's config file")
    if os.path.isfile(name_or_path):
        return name_or_path
    try:
        return get_config_file(name_or_path)
    except RuntimeError:
        pass
    raise FileNotFoundError(
        f"{what} = '{name_or_path}' is neither an existing file nor a detectron2 model-zoo "
        f"config name (e.g. 'COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml')"
    )


def teacher_config(config_file: str, opts: Sequence[str] = ()):
    """Load the teacher's config (yacs CfgNode for .yaml, LazyConfig for .py) with overrides."""
    path = resolve_config_file(config_file)
    if path.endswith(".py"):
        cfg = LazyConfig.load(path)
        return LazyConfig.apply_overrides(cfg, list(opts))
    cfg = MasKDCfgNode(get_cfg())  # detectron2's keys; _BASE_ may name a zoo: config
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def build_teacher(config_file: str, opts: Sequence[str] = (), device: str = "cpu") -> nn.Module:
    """Build a teacher meta-architecture (random weights) from its config.

    Args:
        config_file: a yacs .yaml or LazyConfig .py path, or a model-zoo name.
        opts: overrides (yacs: ["KEY", "VALUE", ...]; LazyConfig: ["key=value", ...]).
        device: where to put it.
    """
    cfg = teacher_config(config_file, opts)
    if isinstance(cfg, CfgNode):
        cfg.MODEL.DEVICE = device
        model = build_model(cfg)
    else:
        model = instantiate(cfg.model).to(device)
    return model


def load_weights_strict(model: nn.Module, path: str, what: str, ignore: Sequence[str] = ()) -> None:
    """Load a checkpoint into ``model`` and fail if anything does not fit.

    Accepts every format detectron2's checkpointer reads (.pth with a "model" entry, detectron2
    model-zoo .pkl, detectron2:// and https:// paths).

    Args:
        model: the module to load into (e.g. a teacher).
        path: the checkpoint.
        what: the config key or argument that named the file, for error messages.
        ignore: key prefixes of ``model`` that the checkpoint need not hold.

    Raises:
        FileNotFoundError: if a local file does not exist.
        ValueError: naming the file and the keys, if keys are missing or shapes differ.
    """
    if not path:
        raise FileNotFoundError(f"{what} is empty")
    checkpointer = DetectionCheckpointer(model)
    checkpoint = read_checkpoint(path, model, what)
    if "model" not in checkpoint:
        raise ValueError(f"{what}: '{path}' holds no model weights")
    incompatible = checkpointer._load_model(checkpoint)
    missing = [k for k in incompatible.missing_keys if not k.startswith(tuple(ignore))]
    # pixel_mean/std are buffers that come from the config; old checkpoints lack them.
    missing = [k for k in missing if k.split(".")[-1] not in ("pixel_mean", "pixel_std")]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (file {a}, model {b})" for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"shape mismatches: {_short(shapes)}")
    if problems:
        raise ValueError(
            f"{what}: '{path}' does not fit the model: " + "; ".join(problems) + ". "
            "Check that the config and the weights describe the same model."
        )
    if incompatible.unexpected_keys:
        logger.warning(
            "%s: '%s' has keys the model does not use: %s",
            what,
            path,
            _short(incompatible.unexpected_keys),
        )
    logger.info("Loaded %s from %s", what, path)


def _short(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` on every parameter and eval mode; returns the module."""
    module.requires_grad_(False)
    module.eval()
    return module


def prepare_teacher(teacher: nn.Module, weights: str, allow_random_init: bool, what: str):
    """Load the teacher's weights (or refuse to go on without them) and freeze it.

    Args:
        teacher: a detectron2 meta-architecture.
        weights: its checkpoint; empty only together with ``allow_random_init``.
        allow_random_init: accept an untrained teacher (tests and smoke runs).
        what: the config key or argument naming the weights, for messages.
    """
    if weights:
        load_weights_strict(teacher, weights, what)
    elif allow_random_init:
        logger.warning("%s is empty: the teacher keeps its random initialisation", what)
    else:
        raise ValueError(
            f"{what} is empty: a teacher needs trained weights (set it to the teacher's "
            "checkpoint; only smoke tests set MODEL.MASKD.TEACHER.ALLOW_RANDOM_INIT)"
        )
    return freeze(teacher)


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
