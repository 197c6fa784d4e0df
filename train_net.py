#!/usr/bin/env python
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
--register-coco NAME ANNOTATIONS.json IMAGE_DIR (repeatable), then use NAME in the config.
"""

import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import maskd  # noqa: F401  (registers the meta-architectures)
from maskd.checkpoint import MasKDCheckpointer
from maskd.config import get_maskd_cfg
from maskd.engine import (
    MasKDTrainer,
    check_datasets,
    create_ddp_model,
    lazy_test,
    lazy_train,
    register_coco_datasets,
)

logger = logging.getLogger("maskd.train_net")


def setup_yacs(args):
    cfg = get_maskd_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # As detectron2's projects do: the library's own logger ("maskd") writes too.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskd")
    return cfg


def main_yacs(args):
    cfg = setup_yacs(args)
    if args.eval_only:
        check_datasets(cfg.DATASETS.TEST)
        model = MasKDTrainer.build_model(cfg)
        MasKDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = MasKDTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = MasKDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main_lazy(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="maskd")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        MasKDCheckpointer(model).load(cfg.train.init_checkpoint)
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=args.resume)


def main(args):
    register_coco_datasets(args.register_coco or [])
    if args.config_file.endswith(".py"):
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
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
