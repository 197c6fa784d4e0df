"""Training and evaluation entry points for both config systems, on detectron2's own engine.

* :class:`MasKDTrainer`: detectron2's ``DefaultTrainer``, extended through its overridable
  methods: the MasKD checkpointer, an Adam option for token learning, evaluators chosen from
  the dataset metadata, the stage-1 retention, and a DDP wrapper that also works for CPU
  processes (GLOO).
* :func:`lazy_train` / :func:`lazy_test`: the LazyConfig path of detectron2's
  ``tools/lazyconfig_train_net.py``, with the same additions.
* :func:`build_inference_model` / :func:`load_inference_weights`: evaluation of a checkpoint
  without the files its training read (teacher weights, tokens).
* :func:`register_coco_datasets`: register COCO-format datasets given on the command line.
"""

import copy
import logging
import math
import os
import weakref
from typing import Callable, Dict, Iterable, List

import torch
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    default_writers,
    hooks,
)
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.modeling import build_model
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from ._compat import cpu_ddp_in_default_trainer
from .checkpoint import MasKDCheckpointer, load_weights_strict
from .datasets import (  # noqa: F401  (re-exported: train_net.py and the tests use them here)
    check_datasets,
    check_evaluation_dependencies,
    load_datasets,
    register_coco_datasets,
)
from .deeplab import build_deeplab_train_loader, build_lr_scheduler, is_deeplab
from .meta_arch import student_config
from .teacher import thing_classes
from .token_learner import MasKDTokenLearner

__all__ = [
    "MasKDTrainer",
    "build_inference_model",
    "build_lazy_inference_model",
    "load_inference_weights",
    "create_ddp_model",
    "build_evaluator",
    "register_coco_datasets",
    "check_datasets",
    "check_class_counts",
    "check_input_format",
    "check_evaluation_dependencies",
    "lazy_train",
    "lazy_test",
    "PRIMARY_METRICS",
    "retention",
    "evaluate_with_retention",
]

logger = logging.getLogger(__name__)


def create_ddp_model(
    model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs
) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when there are several processes.

    Copied from ``detectron2.engine.defaults.create_ddp_model`` (detectron2 v0.7.2), changed
    in one point: for a CPU model (GLOO processes) it passes no ``device_ids``, which
    DistributedDataParallel rejects for CPU modules. Frozen parameters (teacher, tokens in stage 2) have ``requires_grad=False`` and are
    not synchronised as trainable; keep ``find_unused_parameters`` off: every trainable
    parameter gets a gradient in every step.
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cpu":
        kwargs.pop("device_ids", None)
    elif "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


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


def build_optimizer(cfg, model):
    """SGD as in detectron2, or Adam / AdamW (``SOLVER.OPTIMIZER``), e.g. for token learning.

    Only parameters with ``requires_grad`` enter the optimizer: never the teacher, and the
    tokens only in stage 1.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        return DefaultTrainer.build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if name not in ("ADAM", "ADAMW"):
        raise ValueError(f"SOLVER.OPTIMIZER must be SGD, ADAM or ADAMW, got '{name}'")
    cls = torch.optim.Adam if name == "ADAM" else torch.optim.AdamW
    return maybe_add_gradient_clipping(cfg, cls)(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


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
    learner = _unwrap(model)
    if not isinstance(learner, MasKDTokenLearner):
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
        "tokens lose part of the teacher's accuracy. %s See the README's 'Reading the token "
        "statistics'.",
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


def build_inference_model(cfg) -> torch.nn.Module:
    """The model that evaluates a checkpoint of ``cfg`` (``--eval-only``), built without reading
    any weights: the checkpoint (:func:`load_inference_weights`) holds all of them.

    * stage 2 (``MasKD``): the student alone, from its own config (MasKD's inference is the
      student's; teacher and tokens are neither built nor read);
    * stage 1 (``MasKDTokenLearner``): the masked teacher, its weights not read from
      ``MODEL.MASKD.TEACHER.WEIGHTS`` (the stage-1 checkpoint holds teacher and tokens);
    * anything else: ``build_model(cfg)``.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "MasKD":
        model = build_model(student_config(cfg))
    elif arch == "MasKDTokenLearner":
        model = MasKDTokenLearner(cfg, load_teacher=False)
        model.to(torch.device(cfg.MODEL.DEVICE))
    else:
        return build_model(cfg)
    logger.info("Model for evaluation (%s checkpoint):\n%s", arch, model)
    return model


def build_lazy_inference_model(cfg) -> torch.nn.Module:
    """:func:`build_inference_model` for a LazyConfig: ``cfg.model.student`` for a ``MasKD``
    model, the stage-1 model with ``model.teacher.load=False``; else ``cfg.model``."""
    node = copy.deepcopy(cfg.model)
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    name = getattr(target, "__name__", str(target).rsplit(".", 1)[-1])
    if name == "MasKD":
        node = node.student
    elif name == "MasKDTokenLearner" and "load" in _callable_args(node.teacher):
        node.teacher.load = False
    model = instantiate(node)
    model.to(cfg.train.device)
    return model


def _callable_args(node) -> List[str]:
    import inspect

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        target = locate(target)
    try:
        return list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return []


def load_inference_weights(model: torch.nn.Module, path: str, what: str = "MODEL.WEIGHTS"):
    """Load the checkpoint to evaluate, strictly: every weight of ``model`` must be in it (a
    stage-2 checkpoint gives a student-only model its ``student.*`` weights).

    Raises:
        ValueError: naming the missing keys, rather than evaluating partly random weights.
    """
    load_weights_strict(model, path, what)


def check_class_counts(model: torch.nn.Module, dataset_names: Iterable[str]) -> None:
    """Fail, naming the numbers, if the model that learns from the training data predicts
    another number of object classes than the data has: the teacher in stage 1 (its task loss
    trains the tokens), the student in stage 2 or a plain model. Call it once the datasets are
    loaded (their metadata then has ``thing_classes``)."""
    model = _unwrap(model)
    if isinstance(model, MasKDTokenLearner):
        who, learner = "the teacher (stage 1 trains the tokens with its task loss)", model.teacher
    elif hasattr(model, "teacher") and hasattr(model, "student"):
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


def check_positive(value, key: str) -> None:
    """Fail, naming the key, unless ``value`` is a positive number (iterations, batch size)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{key} must be a positive number for training, got {value!r}")


def check_input_format(model: torch.nn.Module, data_format: str, what: str) -> None:
    """Fail if a MasKD model was built for images of another channel order than the data this
    run loads (its ``input_format`` vs ``INPUT.FORMAT`` / the mapper's ``image_format``). The
    teacher may read another order than the data: the model converts for it
    (:mod:`maskd.pairing`), which is why the model must know the data's."""
    inner = _unwrap(model)
    if getattr(inner, "teacher", None) is None:
        return
    expects = getattr(inner, "input_format", None)
    if expects and data_format and expects != data_format:
        raise ValueError(
            f"the MasKD model was built for {expects} images (its input_format), but this run "
            f"feeds {data_format} ({what}): give the model the data's channel order"
        )


class MasKDTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer for MasKD models (both stages, and plain students).

    Extends it through its overridable methods; ``__init__`` is DefaultTrainer's, run with
    :func:`create_ddp_model` in place of detectron2's (which fails for CPU processes), and
    :meth:`build_hooks` installs the :class:`MasKDCheckpointer` before the hooks are made.
    """

    def __init__(self, cfg):
        check_positive(cfg.SOLVER.MAX_ITER, "SOLVER.MAX_ITER")
        check_positive(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
        check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        check_evaluation_dependencies(cfg.DATASETS.TEST)
        with cpu_ddp_in_default_trainer(create_ddp_model):
            super().__init__(cfg)
        check_class_counts(self.model, cfg.DATASETS.TRAIN)  # the train loader loaded them
        check_input_format(self.model, cfg.INPUT.FORMAT, "INPUT.FORMAT")

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; the
        # PeriodicCheckpointer hook and resume_or_load use the one set here.
        self.checkpointer = MasKDCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)  # detectron2's, plus DeepLab's WarmupPolyLR

    @classmethod
    def build_train_loader(cls, cfg):
        if is_deeplab(cfg):  # the DeepLab project's augmentation (resize, then crop)
            return build_deeplab_train_loader(cfg)
        return super().build_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation; a stage-1 model is also evaluated without masks, and the
        retention (masked teacher / teacher) is logged and returned (see
        :func:`evaluate_with_retention`)."""

        def evaluate(teacher: bool):
            if not teacher or evaluators is not None:
                return super(MasKDTrainer, cls).test(cfg, model, evaluators)
            folder = os.path.join(cfg.OUTPUT_DIR, "inference", "teacher_without_masks")
            own = [cls.build_evaluator(cfg, name, folder) for name in cfg.DATASETS.TEST]
            return super(MasKDTrainer, cls).test(cfg, model, own)

        return evaluate_with_retention(model, evaluate)

    def train(self):
        """Train; after a stage-1 run, the last log line states its retention."""
        results = super().train()
        # the evaluation hook put the last evaluation's results, retention included, in storage
        latest = self.storage.latest()
        ratios = {
            k[len("retention/") :]: v for k, (v, _) in latest.items() if k.startswith("retention/")
        }
        log_final_retention(ratios, self.storage)
        return results


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


def lazy_train(cfg, resume: bool = False):
    """Train from a LazyConfig, as detectron2's ``tools/lazyconfig_train_net.py`` does.

    Adapted from ``do_train`` of detectron2's ``tools/lazyconfig_train_net.py`` (v0.7.2; a
    script, not importable), changed in: the MasKD checkpointer, :func:`create_ddp_model`, the
    evaluation through :func:`lazy_test` (stage-1 retention) and the closing retention line.

    Keys: ``model``, ``dataloader.train/test/evaluator``, ``optimizer``, ``lr_multiplier``,
    ``train`` (``output_dir``, ``init_checkpoint`` for the student, ``max_iter``, ``amp``,
    ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``).
    """
    check_positive(cfg.train.max_iter, "train.max_iter")
    model = instantiate(cfg.model)
    logging.getLogger("detectron2").info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    names = cfg.dataloader.train.dataset.get("names", ())
    check_class_counts(model, [names] if isinstance(names, str) else list(names))
    fmt = cfg.dataloader.train.get("mapper", {}).get("image_format", None)
    check_input_format(model, fmt, "dataloader.train.mapper.image_format")
    tests = cfg.dataloader.get("test", {}).get("dataset", {}).get("names", ())
    check_evaluation_dependencies([tests] if isinstance(tests, str) else list(tests))
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_cls(model, train_loader, optim)
    checkpointer = MasKDCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    last = {}  # the last evaluation's results

    def evaluate():
        last["out"] = lazy_test(cfg, model)
        return last["out"]

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    out = last.get("out")
    log_final_retention(out.get("retention", {}) if isinstance(out, dict) else {}, trainer.storage)
