"""Training and evaluation entry points for both config systems, on detectron2's own engine.

* :class:`MasKDTrainer` (``trainer.py``): detectron2's ``DefaultTrainer``, extended through its
  overridable methods: the MasKD checkpointer, an Adam option for token learning, evaluators
  chosen from the dataset metadata, the stage-1 retention, and a DDP wrapper that also works
  for CPU processes (GLOO, ``ddp.py``).
* :func:`lazy_train` (``lazy.py``) / :func:`lazy_test` (``evaluation.py``): the LazyConfig path
  of detectron2's ``tools/lazyconfig_train_net.py``, with the same additions.
* :func:`build_inference_model` / :func:`load_inference_weights` (``inference.py``):
  evaluation of a checkpoint without the files its training read (teacher weights, tokens).
* checks before a run (``checks.py``) and dataset registration (:mod:`maskd.data.datasets`).
"""

from ..data.datasets import (
    check_coco_images_once,
    check_datasets,
    check_evaluation_dependencies,
    load_datasets,
    register_coco_datasets,
)
from .checks import check_class_counts, check_input_format
from .ddp import create_ddp_model
from .evaluation import (
    PRIMARY_METRICS,
    build_evaluator,
    evaluate_with_retention,
    lazy_test,
    log_final_retention,
    retention,
)
from .inference import build_inference_model, build_lazy_inference_model, load_inference_weights
from .lazy import lazy_train
from .trainer import MasKDTrainer, build_optimizer

__all__ = [
    "MasKDTrainer",
    "build_optimizer",
    "build_inference_model",
    "build_lazy_inference_model",
    "load_inference_weights",
    "create_ddp_model",
    "build_evaluator",
    "register_coco_datasets",
    "check_coco_images_once",
    "check_datasets",
    "load_datasets",
    "check_class_counts",
    "check_input_format",
    "check_evaluation_dependencies",
    "lazy_train",
    "lazy_test",
    "PRIMARY_METRICS",
    "retention",
    "evaluate_with_retention",
    "log_final_retention",
]
