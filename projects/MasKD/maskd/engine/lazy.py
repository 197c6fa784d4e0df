"""Training from a LazyConfig, as detectron2's ``tools/lazyconfig_train_net.py`` does."""

import logging

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.utils import comm

from ..checkpoint import MasKDCheckpointer
from ..data.datasets import check_evaluation_dependencies
from ..utils.numbers import check_number
from .checks import check_class_counts, check_input_format
from .ddp import create_ddp_model
from .evaluation import lazy_test, log_final_retention

__all__ = ["lazy_train"]


def lazy_train(cfg, resume: bool = False):
    """Train from a LazyConfig, as detectron2's ``tools/lazyconfig_train_net.py`` does.

    Adapted from ``do_train`` of detectron2's ``tools/lazyconfig_train_net.py`` (v0.7.2; a
    script, not importable), changed in: the MasKD checkpointer, :func:`create_ddp_model`, the
    evaluation through :func:`lazy_test` (stage-1 retention) and the closing retention line.

    Keys: ``model``, ``dataloader.train/test/evaluator``, ``optimizer``, ``lr_multiplier``,
    ``train`` (``output_dir``, ``init_checkpoint`` for the student, ``max_iter``, ``amp``,
    ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``).
    """
    check_number(cfg.train.max_iter, "train.max_iter", zero_allowed=False)
    if "lr" in cfg.optimizer:
        check_number(cfg.optimizer.lr, "optimizer.lr", zero_allowed=False)
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
