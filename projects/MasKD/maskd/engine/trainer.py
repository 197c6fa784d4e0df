"""``MasKDTrainer``: detectron2's ``DefaultTrainer`` for MasKD models (both stages, and plain
students), extended through its overridable methods."""

import os
import weakref

import torch
from detectron2.engine import DefaultTrainer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from .._compat import cpu_ddp_in_default_trainer
from ..checkpoint import MasKDCheckpointer
from ..data.datasets import check_datasets, check_evaluation_dependencies
from ..projects.deeplab import build_deeplab_train_loader, build_lr_scheduler, is_deeplab
from ..utils.numbers import check_number
from .checks import check_class_counts, check_input_format
from .ddp import create_ddp_model
from .evaluation import build_evaluator, evaluate_with_retention, log_final_retention

__all__ = ["MasKDTrainer", "build_optimizer"]


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


class MasKDTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer for MasKD models (both stages, and plain students).

    Extends it through its overridable methods; ``__init__`` is DefaultTrainer's, run with
    :func:`create_ddp_model` in place of detectron2's (which fails for CPU processes), and
    :meth:`build_hooks` installs the :class:`MasKDCheckpointer` before the hooks are made.
    """

    def __init__(self, cfg):
        check_number(cfg.SOLVER.MAX_ITER, "SOLVER.MAX_ITER", zero_allowed=False)
        check_number(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH", zero_allowed=False)
        check_number(cfg.SOLVER.BASE_LR, "SOLVER.BASE_LR", zero_allowed=False)
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
