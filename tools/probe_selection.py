#!/usr/bin/env python
"""Would selective masks help a teacher? The two measurements behind stage 1's choice of masks.

1. **Offset**: per distilled level, how far the teacher's features sit from zero compared with
   how much they vary over the image: the norm of the per-image mean feature vector over the
   mean per-pixel distance from it. A large ratio means that every pixel's feature is close to
   one common vector, so a single token aligned with it is on everywhere.
2. **Does masking lower the teacher's own loss?** The teacher's training losses (its heads in
   training mode, backbone and normalisation frozen, as stage 1 runs it) on the same images and
   the same proposal sampling, with every distilled level multiplied by a fixed mask: all ones
   (the plain teacher, which the paper's stage-1 optimum reproduces), the ground-truth boxes'
   cells (background 0 or 0.5), and 0.5 everywhere. Stage 1 minimises exactly this loss (plus
   Dice); if no selective mask beats the all-ones mask, its optimum is the all-on mask.

    python tools/probe_selection.py --config-file configs/Demo/shapes_teacher_R34.yaml \\
        --weights output/demo/teacher_t0/model_final.pth --dataset maskd_shapes_val \\
        --register-coco maskd_shapes_val datasets/shapes/val_.../annotations.json \\
        datasets/shapes/val_.../images --num 96
"""

import argparse
import json
import logging
import statistics

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from torch import nn

from maskd.config import load_config
from maskd.engine import register_coco_datasets
from maskd.modeling.mask_sources import box_cells
from maskd.modeling.meta_arch.token_learner import task_loss_mode
from maskd.modeling.teacher import build_teacher, head_levels, preprocess_images
from maskd.utils.files import atomic_write, write_text

logger = logging.getLogger("maskd.probe_selection")


class FixedMaskBackbone(nn.Module):
    """A frozen backbone whose listed levels are multiplied by masks made from the batch."""

    def __init__(self, inner, levels, strides):
        super().__init__()
        self.inner, self.levels, self.strides = inner, levels, strides
        self.mask_fn = None
        self.size_divisibility = inner.size_divisibility
        self.padding_constraints = getattr(inner, "padding_constraints", {})

    def output_shape(self):
        return self.inner.output_shape()

    def forward(self, x):
        with torch.no_grad():
            out = dict(self.inner(x))
            for lv in self.levels:
                out[lv] = out[lv] * self.mask_fn(lv, out[lv])  # (N, C, H, W) * (N, 1, H, W)
        return out


def box_masks(batch, stride, shape, background):
    """(N, 1, H, W): 1 on the boxes' cells, ``background`` elsewhere."""
    n, _, h, w = shape
    fg = torch.stack([box_cells(x["instances"].gt_boxes.tensor, stride, h, w) for x in batch])
    return (fg + background * (1 - fg))[:, None]


def offsets(teacher, batches, levels):
    """Per level: mean over images of |mean feature| / mean |feature - mean feature|."""
    ratios = {lv: [] for lv in levels}
    for batch in batches:
        images = preprocess_images(teacher, batch)
        with torch.no_grad():
            feats = teacher.backbone.inner(images.tensor)
        for lv in levels:
            f = feats[lv].flatten(2)  # (N, C, HW)
            mean = f.mean(dim=2, keepdim=True)  # (N, C, 1)
            spread = (f - mean).norm(dim=1).mean(dim=1)  # (N,)
            ratios[lv] += (mean.squeeze(2).norm(dim=1) / spread).tolist()
    return {lv: statistics.mean(v) for lv, v in ratios.items()}


def masked_losses(teacher, batches, variants):
    """The teacher's summed training losses per variant, averaged over the batches, with the
    proposal sampling seeded alike for every variant."""
    out = {}
    for name, fn in variants.items():
        totals = []
        for i, batch in enumerate(batches):
            teacher.backbone.mask_fn = lambda lv, f, b=batch, fn=fn: fn(b, lv, f)
            torch.manual_seed(i)
            with EventStorage(0), task_loss_mode(teacher), torch.no_grad():
                losses = teacher(batch)
            totals.append({k: v.item() for k, v in losses.items()})
        keys = sorted(totals[0])
        out[name] = {k: statistics.mean(t[k] for t in totals) for k in keys}
        out[name]["total"] = sum(out[name][k] for k in keys)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the teacher's config")
    parser.add_argument("--weights", required=True, help="the teacher's trained weights")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--register-coco", nargs=3, action="append", default=[])
    parser.add_argument("--num", type=int, default=96, help="images")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    setup_logger(name="maskd")
    register_coco_datasets(args.register_coco)
    cfg = load_config(args.config_file)
    teacher = build_teacher(args.config_file, weights=args.weights, what="--weights")
    levels = head_levels(teacher)
    shapes = teacher.backbone.output_shape()
    strides = {lv: shapes[lv].stride for lv in levels}
    teacher.backbone = FixedMaskBackbone(teacher.backbone, levels, strides)
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(args.dataset)[: args.num]
    torch.manual_seed(0)
    items = [mapper(d) for d in dicts]
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]

    ratio = offsets(teacher, batches, levels)
    variants = {
        "ones (plain teacher)": lambda b, lv, f: torch.ones_like(f[:, :1]),
        "boxes, background 0": lambda b, lv, f: box_masks(b, strides[lv], f.shape, 0.0),
        "boxes, background 0.5": lambda b, lv, f: box_masks(b, strides[lv], f.shape, 0.5),
        "0.5 everywhere": lambda b, lv, f: torch.full_like(f[:, :1], 0.5),
    }
    losses = masked_losses(teacher, batches, variants)
    print("offset |mean feature| / mean |feature - mean|, per level:")
    print("  " + "  ".join(f"{lv} {r:.2f}" for lv, r in ratio.items()))
    keys = [k for k in next(iter(losses.values())) if k != "total"] + ["total"]
    print(f"\nthe teacher's training losses on {len(items)} images of {args.dataset}:")
    print(f"{'mask on every level':<24}" + "".join(f"{k:>16}" for k in keys))
    for name, row in losses.items():
        print(f"{name:<24}" + "".join(f"{row[k]:>16.4f}" for k in keys))
    if args.output:
        text = json.dumps({"offset": ratio, "losses": losses, "images": len(items)}, indent=1)
        atomic_write(args.output, lambda tmp: write_text(tmp, text), overwrite=True)


if __name__ == "__main__":
    main()
