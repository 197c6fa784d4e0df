"""Evaluation: detectron2's evaluators chosen from the dataset metadata, and stage 1's retention
(the masked teacher's accuracy over the plain teacher's), for both config systems."""

import copy
import logging
import math
import os
from typing import Callable, Dict

import torch
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm
from omegaconf import DictConfig

from ..checkpoint.format import STAGE1, model_stage
from ..data.datasets import check_evaluation_dependencies
from .ddp import unwrap

__all__ = [
    "build_evaluator",
    "PRIMARY_METRICS",
    "retention",
    "evaluate_with_retention",
    "log_final_retention",
    "lazy_test",
]

logger = logging.getLogger(__name__)


def build_evaluator(cfg, dataset_name: str, output_folder=None):
    """detectron2's evaluator for a dataset, chosen from its metadata ``evaluator_type``.

    COCO-format datasets registered with ``register_coco_instances`` count as "coco".
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = getattr(meta, "evaluator_type", None) or "coco"
    evaluators = []
    if evaluator_type in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type == "cityscapes_sem_seg":
        check_evaluation_dependencies([dataset_name])
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
    if evaluator_type == "coco_panoptic_seg":
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset '{dataset_name}' of type '{evaluator_type}'"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


# The metric that stands for a task's accuracy in detectron2's evaluator results.
PRIMARY_METRICS = {"bbox": "AP", "segm": "AP", "sem_seg": "mIoU", "panoptic_seg": "PQ"}


def retention(masked: dict, teacher: dict, prefix: str = "") -> Dict[str, float]:
    """Stage 1's retention: the masked teacher's accuracy over the plain teacher's.

    Args:
        masked, teacher: detectron2 evaluation results of the same datasets and evaluators,
            ``{task: {metric: value}}`` or ``{dataset: {task: {metric: value}}}``.

    Returns:
        ``"[<dataset>/]<task>/<metric>" -> masked / teacher`` for the primary metric of every
        task both hold (:data:`PRIMARY_METRICS`); NaN where the teacher's value is 0 or
        undefined (e.g. COCO AP without detections).
    """
    out = {}
    for key, value in masked.items():
        if not isinstance(value, dict) or not isinstance(teacher.get(key), dict):
            continue
        metric = PRIMARY_METRICS.get(key)
        if metric is not None and metric in value and metric in teacher[key]:
            m, t = float(value[metric]), float(teacher[key][metric])
            ratio = m / t if t != 0 and math.isfinite(t) and math.isfinite(m) else math.nan
            out[f"{prefix}{key}/{metric}"] = ratio
        else:
            out.update(retention(value, teacher[key], f"{prefix}{key}/"))
    return out


def evaluate_with_retention(model: torch.nn.Module, evaluate: Callable[[bool], dict]) -> dict:
    """Evaluate ``model``; for a stage-1 model also the plain teacher, and the retention.

    Args:
        model: any model; a ``MasKDTokenLearner`` (or a DDP wrapper of one) is evaluated twice.
        evaluate: ``evaluate(teacher)`` runs detectron2's evaluation of ``model`` as it is set
            and returns its results; ``teacher`` is True for the pass without masks (use other
            evaluator output folders then, so the masked teacher's files are kept).

    Returns:
        the results of ``model``; for stage 1 with two more entries: ``"teacher"`` (the plain
        teacher's results) and ``"retention"`` (:func:`retention`), which detectron2's
        ``EvalHook`` writes to the event storage as ``teacher/...`` and ``retention/...``.
    """
    results = evaluate(False)
    learner = unwrap(model)
    if model_stage(learner) != STAGE1:
        return results
    with learner.masks_disabled():  # every rank: the evaluators gather across processes
        teacher = evaluate(True)
    if not comm.is_main_process() or not results:
        return results
    ratios = retention(results, teacher)
    logger.info(
        "Stage 1 retention (masked teacher / teacher): %s",
        _retention_text(results, teacher, ratios),
    )
    results = dict(results)
    results["teacher"] = teacher
    results["retention"] = ratios
    return results


# Below this retention the end of stage 1 warns and names the levels that look switched off.
LOW_RETENTION = 0.95


def log_final_retention(ratios: Dict[str, float], storage=None) -> None:
    """The closing log line of a stage-1 run: its retention (``"bbox/AP" -> ratio``, from the
    last evaluation), if it has one.

    Below :data:`LOW_RETENTION` it is a warning, naming the levels whose combined mask
    (``[metric]tokens/<level>/combined`` in ``storage``) passes less than half the features.
    """
    if not (comm.is_main_process() and ratios):
        return
    text = ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items())
    if all(v >= LOW_RETENTION for v in ratios.values()):
        logger.info("MasKD stage 1 finished: retention (masked teacher / teacher) %s", text)
        return
    dark = []
    if storage is not None:
        for name, history in storage.histories().items():
            if name.startswith("[metric]tokens/") and name.endswith("/combined"):
                if history.latest() < 0.5:
                    dark.append(f"{name.split('/')[1]} ({history.latest():.2f})")
    logger.warning(
        "MasKD stage 1 finished: retention (masked teacher / teacher) %s, below %.2f: the "
        "tokens lose part of the teacher's accuracy. %s See docs/diagnostics.md.",
        text,
        LOW_RETENTION,
        (
            f"Levels whose combined mask passes under half of the features: {', '.join(dark)}."
            if dark
            else ""
        ),
    )


def _retention_text(masked: dict, teacher: dict, ratios: Dict[str, float]) -> str:
    parts = []
    for path, ratio in ratios.items():
        keys = path.split("/")
        m, t = masked, teacher
        for k in keys:
            m, t = m[k], t[k]
        parts.append(f"{path} {m:.2f} / {t:.2f} = {ratio:.3f}")
    return "; ".join(parts) or "no primary metric in the results"


def lazy_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; a
    stage-1 model also without masks, with the retention (:func:`evaluate_with_retention`)."""
    if "evaluator" not in cfg.dataloader:
        return {}

    def evaluate(teacher: bool):
        node = cfg.dataloader.evaluator
        if teacher and isinstance(node, DictConfig) and node.get("output_dir"):
            node = copy.deepcopy(node)  # keep the masked teacher's files
            node.output_dir = os.path.join(node.output_dir, "teacher_without_masks")
        evaluator = instantiate(node)
        results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
        print_csv_format(results)
        return results

    return evaluate_with_retention(model, evaluate)
