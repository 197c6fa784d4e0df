#!/usr/bin/env python
"""Visualise the receptive masks of learned tokens: one PNG grid per image (rows: levels,
columns: the image and one overlay per token), like the paper's mask figure. Under each level's
image: its token statistics (maskd.modeling.diagnostics: coverage, share of near-constant masks, Dice
overlap between tokens, token-weight entropy, combined mask, effective number of weighted
tokens, overlap of the weighted tokens, and for --dataset images the share of stage 2's loss
weight on the ground-truth boxes' cells beside that under whole-map mimicking); their means over
the images are logged and written to <output>/token_statistics.json.

    python tools/visualize_masks.py --config-file configs/.../<stage-1>.yaml \\
        --checkpoint output/<stage-1>/model_final.pth --input a.jpg b.jpg --output vis/
    python tools/visualize_masks.py --config-file ... --checkpoint ... \\
        --dataset coco_2017_val --num 8 --output vis/

With --checkpoint, a stage-1 config needs no teacher weights (the checkpoint holds teacher and
tokens). A stage-2 config works too: its teacher and TOKENS_WEIGHTS are loaded when the model is
built (then replaced by --checkpoint's, if given).
"""

import argparse
import json
import logging
import os
import statistics

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.logger import setup_logger

from maskd import MasKDTokenLearner
from maskd.config import load_config
from maskd.engine import build_inference_model, load_inference_weights, register_coco_datasets
from maskd.utils.extensions import add_import_argument, import_modules
from maskd.utils.files import atomic_write, write_text
from maskd.utils.visualize import save_mask_grid

logger = logging.getLogger("maskd.visualize_masks")


def build(args):
    """The model whose masks are drawn: a stage-1 model (its weights from --checkpoint, or the
    teacher weights of the config) or a stage-2 model (built with its files)."""
    cfg = load_config(args.config_file, args.opts)
    if not isinstance(cfg, CfgNode):
        model = instantiate(cfg.model).to(args.device)
        if args.checkpoint:
            load_inference_weights(model, args.checkpoint, "--checkpoint")
        return model, model.input_format or "BGR", args.min_size, args.max_size
    cfg.MODEL.DEVICE = args.device
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if args.checkpoint and issubclass(arch, MasKDTokenLearner):  # the checkpoint holds the teacher
        model = build_inference_model(cfg)
    else:
        model = build_model(cfg)
    if args.checkpoint:
        load_inference_weights(model, args.checkpoint, "--checkpoint")
    return model, cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoint", default="", help="stage-1 checkpoint holding the tokens")
    parser.add_argument("--input", nargs="*", default=[], help="image files")
    parser.add_argument("--dataset", default="", help="or: a registered dataset name")
    parser.add_argument("--num", type=int, default=4, help="images to take from --dataset")
    parser.add_argument(
        "--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_ROOT")
    )
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-size", type=int, default=800, help="LazyConfig: test short side")
    parser.add_argument("--max-size", type=int, default=1333, help="LazyConfig: test long side")
    add_import_argument(parser)
    args, args.opts = parser.parse_known_args(argv)
    setup_logger(name="maskd")
    import_modules(args.imports)
    register_coco_datasets(args.register_coco or [])

    records = [{"file_name": f} for f in args.input]
    if args.dataset:
        records += DatasetCatalog.get(args.dataset)[: args.num]
    files = [r["file_name"] for r in records]
    if not files:
        parser.error("no images: give --input files or --dataset")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        parser.error(f"image files not found: {missing}")

    model, input_format, min_size, max_size = build(args)
    model.eval()
    resize = T.ResizeShortestEdge(min_size, max_size)
    os.makedirs(args.output, exist_ok=True)
    per_image = {}
    for record in records:
        path = record["file_name"]
        image = utils.read_image(path, format=input_format)
        transform = resize.get_transform(image)
        image = transform.apply_image(image)
        item = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy())}
        if "annotations" in record:  # the ground-truth boxes, for the statistics' gt_share
            boxes_only = [
                {k: v for k, v in a.items() if k not in ("segmentation", "keypoints")}
                for a in record["annotations"]
                if a.get("iscrowd", 0) == 0
            ]
            annotations = [
                utils.transform_instance_annotations(
                    a, T.TransformList([transform]), image.shape[:2]
                )
                for a in boxes_only
            ]
            item["instances"] = utils.annotations_to_instances(annotations, image.shape[:2])
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + "_masks.png")
        _, per_image[path] = save_mask_grid(model, item, out, input_format)
    # The token statistics of each level, averaged over the images that have them (as in the
    # grids' labels; gt_share only over images with boxes).
    levels = {lv: list(st) for lv, st in next(iter(per_image.values())).items()}
    for stats in per_image.values():
        for lv, st in stats.items():
            levels[lv] += [k for k in st if k not in levels[lv]]
    mean = {
        lv: {k: statistics.mean(s[lv][k] for s in per_image.values() if k in s[lv]) for k in names}
        for lv, names in levels.items()
    }
    text = json.dumps({"mean": mean, "images": per_image}, indent=1)
    path = os.path.join(args.output, "token_statistics.json")
    atomic_write(path, lambda tmp: write_text(tmp, text), overwrite=True)
    for lv, stats in mean.items():
        logger.info(
            "%s, mean of %d images: %s",
            lv,
            len(per_image),
            ", ".join(f"{k} {v:.3f}" for k, v in stats.items()),
        )


if __name__ == "__main__":
    main()
