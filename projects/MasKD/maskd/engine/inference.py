"""Evaluation of a checkpoint (``--eval-only``) without the files its training read.

Each MasKD meta-architecture says, as class methods, which model evaluates its checkpoints:
``build_inference_model(cfg)`` (yacs) and ``lazy_inference_node(node)`` (LazyConfig). A subclass,
registered under any name, inherits them; a model without them is built as detectron2 builds it.
"""

import copy
import logging

import torch
from detectron2.config import instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.registry import locate
from omegaconf import DictConfig

from ..checkpoint import load_weights_strict

__all__ = ["build_inference_model", "build_lazy_inference_model", "load_inference_weights"]

logger = logging.getLogger(__name__)


def build_inference_model(cfg) -> torch.nn.Module:
    """The model that evaluates a checkpoint of ``cfg`` (``--eval-only``), built without reading
    any weights: the checkpoint (:func:`load_inference_weights`) holds all of them.

    The meta-architecture's ``build_inference_model(cfg)`` class method if it has one (stage 2:
    the student alone; stage 1: the masked teacher without ``TEACHER.WEIGHTS``), else
    ``build_model(cfg)``.
    """
    name = cfg.MODEL.META_ARCHITECTURE
    arch = META_ARCH_REGISTRY.get(name)
    builder = getattr(arch, "build_inference_model", None)
    if builder is None:
        return build_model(cfg)
    model = builder(cfg)
    logger.info("Model for evaluation (%s checkpoint):\n%s", name, model)
    return model


def build_lazy_inference_model(cfg) -> torch.nn.Module:
    """:func:`build_inference_model` for a LazyConfig: ``cfg.model`` as the ``_target_``'s
    ``lazy_inference_node(node)`` class method turns it (stage 2: ``model.student``; stage 1:
    the teacher not loaded), instantiated on ``train.device``."""
    node = copy.deepcopy(cfg.model)
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if isinstance(target, str):
        target = locate(target)
    turn = getattr(target, "lazy_inference_node", None)
    if turn is not None:
        node = turn(node)
    model = instantiate(node)
    model.to(cfg.train.device)
    return model


def load_inference_weights(model: torch.nn.Module, path: str, what: str = "MODEL.WEIGHTS"):
    """Load the checkpoint to evaluate, strictly: every weight of ``model`` must be in it (a
    stage-2 checkpoint gives a student-only model its ``student.*`` weights).

    Raises:
        ValueError: naming the missing keys, rather than evaluating partly random weights.
    """
    load_weights_strict(model, path, what)
