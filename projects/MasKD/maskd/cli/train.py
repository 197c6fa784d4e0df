"""Train and evaluate MasKD models (and plain students) with detectron2.

One entry point for both config systems:

    # yacs (.yaml): stage 1, then stage 2, then evaluation
    python train_net.py --config-file configs/COCO-Detection/<stage-1>.yaml --num-gpus 8
    python train_net.py --config-file configs/COCO-Detection/<stage-2>.yaml --num-gpus 8 \\
        MODEL.MASKD.TOKENS_WEIGHTS output/<stage-1>/model_final.pth
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth

    # LazyConfig (.py): key=value overrides
    python train_net.py --config-file configs/COCO-Detection/<...>.py --num-gpus 8 \\
        model.loss_weight=7 train.output_dir=output/x

detectron2's flags work as usual (--num-gpus, --num-machines, --machine-rank, --dist-url,
--resume, --eval-only). A COCO-format dataset of your own needs no code:
--register-coco NAME ANNOTATIONS.json IMAGE_DIR (repeatable), then use NAME in the config. A
module of your own that registers a head-level KD term, a mask source, a backbone or a
meta-architecture: --import MODULE (a module name or a .py path; repeatable).

--eval-only reads only MODEL.WEIGHTS (LazyConfig: train.init_checkpoint), which must hold every
weight of the evaluated model: a stage-2 checkpoint evaluates its student without the teacher's
or the tokens' files. The results are also written to OUTPUT_DIR/results.json.

For stage 1, stage 2, export and evaluation in one command, see distill_net.py.
"""

import json
import logging
import math
import os
from contextlib import nullcontext
from datetime import timedelta

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import MasKDCheckpointer
from ..config import is_lazy_config, load_config
from ..engine import (
    MasKDTrainer,
    build_inference_model,
    build_lazy_inference_model,
    check_class_counts,
    check_coco_images_once,
    check_datasets,
    create_ddp_model,
    lazy_test,
    lazy_train,
    load_datasets,
    load_inference_weights,
    register_coco_datasets,
)
from ..utils.extensions import add_import_argument, import_modules
from ..utils.files import atomic_write, hold_folder, write_text

logger = logging.getLogger(__name__)


def write_results(results, output_dir: str) -> None:
    """The evaluation results as ``<output_dir>/results.json`` (main process; NaN as null)."""
    if not comm.is_main_process():
        return

    def safe(x):
        if isinstance(x, dict):
            return {k: safe(v) for k, v in x.items()}
        return None if isinstance(x, float) and math.isnan(x) else x

    text = json.dumps(safe(results), indent=1, allow_nan=False)
    path = os.path.join(output_dir, "results.json")
    atomic_write(path, lambda tmp: write_text(tmp, text), overwrite=True)


def setup_yacs(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # As detectron2's projects do: the library's own logger ("maskd") writes too.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskd")
    return cfg


def main_yacs(args):
    cfg = setup_yacs(args)
    if args.eval_only:
        check_datasets(cfg.DATASETS.TEST)
        load_datasets(cfg.DATASETS.TEST)  # files checked, classes known, before the model
        model = build_inference_model(cfg)
        check_class_counts(model, cfg.DATASETS.TEST)
        checkpointer = MasKDCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            load_inference_weights(model, checkpointer.get_checkpoint_file(), "last_checkpoint")
        else:
            load_inference_weights(model, cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
        res = MasKDTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        write_results(res, cfg.OUTPUT_DIR)
        return res
    trainer = MasKDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main_lazy(args):
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="maskd")
    if args.eval_only:
        names = cfg.dataloader.test.get("dataset", {}).get("names", ())
        names = [names] if isinstance(names, str) else list(names)
        check_datasets(names)
        load_datasets(names)
        model = build_lazy_inference_model(cfg)
        check_class_counts(model, names)
        load_inference_weights(model, cfg.train.init_checkpoint, "train.init_checkpoint")
        res = lazy_test(cfg, create_ddp_model(model))
        write_results(res, cfg.train.output_dir)
        return res
    return lazy_train(cfg, resume=args.resume)


def main(args):
    import_modules(args.imports)  # in every process: before the config is made
    register_coco_datasets(args.register_coco or [])
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    return main_yacs(args)


def get_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before training (repeatable)",
    )
    add_import_argument(parser)
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=30.0,
        metavar="MINUTES",
        help="how long the processes of a multi-GPU/multi-machine run wait for each other in a "
        "collective before failing (detectron2's default: 30). When a rank dies, NCCL ranks on "
        "other machines may wait this long before they fail",
    )
    return parser


def _hold_output_dir(args):
    """A training holds its output folder (:func:`maskd.utils.files.hold_folder`) in the launching
    process of the first machine, which lives as long as the run: a second training there is
    refused before it writes anything. Evaluation holds nothing: ``--eval-only`` beside a live
    training is a common habit, and removes none of its files."""
    if args.eval_only or args.machine_rank != 0:
        return nullcontext()
    import_modules(args.imports)  # modules that add config keys, before the config is read
    cfg = load_config(args.config_file, args.opts)
    if is_lazy_config(args.config_file):
        folder, key = cfg.get("train", {}).get("output_dir", ""), "train.output_dir"
    else:
        folder, key = cfg.OUTPUT_DIR, "OUTPUT_DIR"
    return hold_folder(folder, key) if folder else nullcontext()


def cli(argv=None):
    """Parse the command line and run :func:`main` in every process (detectron2's ``launch``)."""
    args = get_parser().parse_args(argv)
    if not args.dist_timeout > 0:
        raise SystemExit(f"--dist-timeout must be positive, got {args.dist_timeout}")
    print("Command Line Args:", args)
    with _hold_output_dir(args):
        if args.num_gpus * args.num_machines > 1:  # the image headers once, not in every worker
            check_coco_images_once(args.register_coco or [])
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timedelta(minutes=args.dist_timeout),
        )


if __name__ == "__main__":
    from maskd.cli.train import cli as _cli  # launch pickles the named module's main

    _cli()
