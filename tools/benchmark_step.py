#!/usr/bin/env python
"""Cost of a MasKD training step, side by side with what it is made of, on CPU.

One run, interleaved repeats, at a fixed size (Faster R-CNN, R18-FPN student, R50-FPN teacher,
256 FPN channels, T=6 tokens on P2-P6, N images of SxS pixels, random weights):

  (a) the student's plain training step (forward + backward),
  (b) the teacher's backbone + FPN forward alone (no grad),
  (c) a MasKD stage-2 step (forward + backward),
  (d) the published style: the whole teacher forward with its heads, the student step, and the
      literal loss with (N, T, C, H, W) tensors and a convolutional mask-weight head.

Prints median seconds and the ratios c / (a + b) (goal <= 1.10) and c / d (goal <= 0.75).

    python tools/benchmark_step.py [--size 800] [--images 2] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import time

import torch
from detectron2.config import get_cfg
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # naive.py, the reference formulas of the tests

from naive import naive_masked_distillation_loss  # tests/naive.py: the plain formulas

from maskd import MasKD
from maskd.receptive_tokens import build_level_tokens


def rcnn_cfg(depth):
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    return cfg


def make_batch(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        inst.gt_boxes = Boxes(
            torch.cat([xy, xy + 16 + torch.rand(5, 2, generator=g) * size * 0.3], 1)
        )
        inst.gt_classes = torch.randint(0, 80, (5,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    student = build_model(rcnn_cfg(18))
    teacher = build_model(rcnn_cfg(50))
    t = build_model(rcnn_cfg(50))
    channels = {lv: s.channels for lv, s in t.backbone.output_shape().items()}
    model = MasKD(
        student=build_model(rcnn_cfg(18)),
        teacher=t,
        tokens=build_level_tokens(channels, 6, True),  # random tokens: a speed benchmark
        custom_mask_warmup=0,
    )
    model.student.load_state_dict(student.state_dict())
    model.teacher.load_state_dict(teacher.state_dict())
    teacher.eval().requires_grad_(False)
    student.train()
    model.train()
    batch = make_batch(args.images, args.size)

    def plain_step():
        sum(student(batch).values()).backward()

    def teacher_backbone():
        with torch.no_grad():
            teacher.backbone(teacher.preprocess_image(batch).tensor)

    def maskd_step():
        sum(model(batch).values()).backward()

    def published_step():
        # The whole teacher runs (heads included) to give its FPN features.
        with torch.no_grad():
            images = teacher.preprocess_image(batch)
            t_feats = teacher.backbone(images.tensor)
            proposals, _ = teacher.proposal_generator(images, t_feats, None)
            teacher.roi_heads(images, t_feats, proposals, None)
        losses = model.student(batch)  # the same student; its backbone keeps its features
        s_feats = model.student.backbone.pop_features()
        kd = 0.0
        for lv in model.in_features:
            rt, t = model.tokens[lv], t_feats[lv]
            with torch.no_grad():
                masks = torch.einsum("tc,nchw->nthw", rt.tokens, t).sigmoid()
                weights = rt.weight_head(t).flatten(1).softmax(1)  # the convolutional head
            kd = kd + naive_masked_distillation_loss(
                model.align[lv](s_feats[lv]), t, masks, weights
            )
        (sum(losses.values()) + kd).backward()

    cases = {
        "(a) student step": plain_step,
        "(b) teacher backbone fwd": teacher_backbone,
        "(c) MasKD step": maskd_step,
        "(d) published-style step": published_step,
    }
    times = {k: [] for k in cases}
    with EventStorage(0):
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b, c, d = med.values()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.images} images {args.size}x{args.size}, R18-FPN student, R50-FPN teacher, "
        f"median of {args.repeats}"
    )
    for name, t in med.items():
        print(f"{name:<28}{t:8.3f} s")
    print(f"c / (a + b) = {c / (a + b):.3f}   (goal <= 1.10)")
    print(f"c / d       = {c / d:.3f}   (goal <= 0.75)")


if __name__ == "__main__":
    main()
