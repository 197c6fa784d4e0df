#!/usr/bin/env python
"""Cost of MasKD's training steps, side by side with what they are made of, on CPU or CUDA.

One run, interleaved repeats, at a fixed size (Faster R-CNN, R18-FPN student, R50-FPN teacher by
default, 256 FPN channels, T=6 tokens on P2-P6, N images of HxW pixels, random weights):

  (a) the student's plain training step (forward + backward),
  (b) the teacher's backbone + FPN forward alone (no grad),
  (c) a MasKD stage-2 step (forward + backward),
  (d) the published style: the whole teacher forward with its heads, the student step, and the
      literal loss with (N, T, C, H, W) tensors and a convolutional mask-weight head,
  (e) a MasKD stage-1 step (teacher frozen; its heads on masked features; backward to the tokens),
  (f) the teacher's inference forward (backbone, RPN, box head; no grad),
  (g) the teacher's forward with its training losses (the heads in training mode), no grad,
  and with --amp on CUDA, (a) and (c) under autocast (float16) with a gradient scaler, as
  detectron2's AMPTrainer runs them (SOLVER.AMP.ENABLED).

Prints the median seconds and the peak memory of each (tools/measure.py: on CPU the rise of the
peak resident set, on CUDA of max_memory_allocated), and the ratios with their goals:

  time  c / (a + b) <= 1.10     stage 2 costs the student step plus the teacher's features
  time  c / d       <= 0.75     against the published style
  mem   c / (a + F) <= 1.10     F = the teacher's FPN feature maps: nothing else of the teacher
                                may stay alive during the student's step
  time  e / (b + 3 (g - b))     <= 1.00: stage 1 is one backbone forward without grad (b), the
                                heads' training forward (g - b) and their backward to the
                                tokens (at most twice that: no parameter gradients); a backward
                                through the backbone would exceed it. e / f is printed too.

    python tools/benchmark_step.py [--size 800] [--width 800] [--images 2] [--repeats 3]
        [--device cuda] [--amp] [--student-depth 18] [--teacher-depth 50] [--json out.json]
"""

import argparse
import copy
import json
from contextlib import nullcontext

import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from measure import measure  # noqa: E402

from maskd import MasKD, MasKDTokenLearner  # noqa: E402
from maskd._compat import NORM_TYPES  # noqa: E402
from maskd.modeling.receptive_tokens import build_level_tokens  # noqa: E402
from maskd.modeling.reference import naive_masked_distillation_loss  # noqa: E402
from maskd.modeling.wrappers import recording  # noqa: E402
from maskd.utils.files import atomic_write, write_text

GOALS = {"c/(a+b)": 1.10, "c/d": 0.75, "mem c/(a+F)": 1.10, "e/(b+3(g-b))": 1.00}


def rcnn_cfg(depth, device):
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"  # calibrated, then frozen (see calibrated())
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    return cfg


def calibrated(model, batch):
    """A randomly initialised detector with FrozenBN statistics taken from the data, as the
    model zoo's ResNets have them: random weights without them give features that grow by
    orders of magnitude with depth (an R101's overflow float32 losses)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model.backbone(model.preprocess_image(batch).tensor)
    model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    return model.eval()


def make_batch(n, height, width, seed=0, with_instances=True):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        inst = Instances((height, width))
        xy = torch.rand(5, 2, generator=g) * torch.tensor([width, height]) * 0.6
        wh = 16 + torch.rand(5, 2, generator=g) * torch.tensor([width, height]) * 0.3
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (5,), generator=g)
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        item = {"image": image, "height": height, "width": width}
        if with_instances:
            item["instances"] = inst
        batch.append(item)
    return batch


def run_benchmark(
    size=800,
    width=None,
    images=2,
    repeats=3,
    device="cpu",
    amp=False,
    student_depth=18,
    teacher_depth=50,
):
    """Measure every case; returns {"setup": str, "cases": {name: (seconds, MiB)}, "ratios":
    {name: value}, "feature_mib": F}."""
    width = width or size
    torch.manual_seed(0)
    batch = make_batch(images, size, width)
    student = calibrated(build_model(rcnn_cfg(student_depth, device)), batch)
    teacher = calibrated(build_model(rcnn_cfg(teacher_depth, device)), batch)
    channels = {lv: s.channels for lv, s in teacher.backbone.output_shape().items()}
    tokens = build_level_tokens(channels, 6, True).to(device)  # random: a speed benchmark
    model = MasKD(student=copy.deepcopy(student), teacher=copy.deepcopy(teacher), tokens=tokens)
    model.custom_mask_warmup = 0
    stage1 = MasKDTokenLearner(teacher=copy.deepcopy(teacher), num_tokens=6)
    teacher.eval().requires_grad_(False)
    student.train()
    model.train()
    stage1.train()
    plain_batch = make_batch(images, size, width, with_instances=False)
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def step(m, autocast=False):
        def run():
            m.zero_grad(set_to_none=True)
            context = torch.autocast("cuda", dtype=torch.float16) if autocast else nullcontext()
            with context:
                loss = sum(m(batch).values())
            (scaler.scale(loss) if autocast else loss).backward()

        return run

    def teacher_backbone():
        with torch.no_grad():
            teacher.backbone(teacher.preprocess_image(batch).tensor)

    def teacher_inference():
        with torch.no_grad():
            teacher(plain_batch)

    def teacher_training_forward():
        # the teacher's own task losses (training-mode heads, frozen normalisation), no grad
        teacher.train()
        for m in teacher.modules():
            if isinstance(m, NORM_TYPES):
                m.eval()
        try:
            with torch.no_grad():
                teacher(batch)
        finally:
            teacher.eval()

    def published_step():
        model.zero_grad(set_to_none=True)
        # The whole teacher runs (heads included) to give its FPN features.
        with torch.no_grad():
            images_ = teacher.preprocess_image(batch)
            t_feats = teacher.backbone(images_.tensor)
            proposals, _ = teacher.proposal_generator(images_, t_feats, None)
            teacher.roi_heads(images_, t_feats, proposals, None)
        with recording(model.student):  # the same student; its backbone keeps its features
            losses = model.student(batch)
            s_feats = model.student.backbone.recorded("features")
        kd = 0.0
        for lv in model.in_features:
            rt, tf = model.tokens[lv], t_feats[lv]
            with torch.no_grad():
                masks = torch.einsum("tc,nchw->nthw", rt.tokens, tf).sigmoid()
                weights = rt.weight_head(tf).flatten(1).softmax(1)  # the convolutional head
            kd = kd + naive_masked_distillation_loss(
                model.align[lv](s_feats[lv]), tf, masks, weights
            )
        (sum(losses.values()) + kd).backward()

    cases = {
        "(a) student step": step(student),
        "(b) teacher backbone fwd": teacher_backbone,
        "(c) MasKD step": step(model),
        "(d) published-style step": published_step,
        "(e) stage-1 step": step(stage1),
        "(f) teacher inference fwd": teacher_inference,
        "(g) teacher losses fwd, no grad": teacher_training_forward,
    }
    if amp:
        cases["(a) student step, AMP"] = step(student, autocast=True)
        cases["(c) MasKD step, AMP"] = step(model, autocast=True)
    with torch.no_grad():
        feats = teacher.backbone(teacher.preprocess_image(batch).tensor)
        feature_mib = sum(f.numel() * f.element_size() for f in feats.values()) / 2**20
    del feats
    results = {}
    with EventStorage(0):
        for fn in cases.values():
            fn()  # warm-up
        per_case = {k: [] for k in cases}
        for _ in range(repeats):  # interleaved: the machine's drift hits every case alike
            for name, fn in cases.items():
                per_case[name].append(measure(fn, 1, device, warmup=False))
    for name, runs in per_case.items():
        secs = sorted(r[0] for r in runs)[len(runs) // 2]
        mems = [r[1] for r in runs if r[1] is not None]
        results[name] = (secs, max(mems) if mems else None)
    (a, ma), (b, _), (c, mc), (d, _), (e, _), (f, _), (g, _) = list(results.values())[:7]
    ratios = {
        "c/(a+b)": c / (a + b),
        "c/d": c / d,
        "e/f": e / f,
        "e/(b+3(g-b))": e / (b + 3 * (g - b)),
    }
    if ma is not None and mc is not None:
        ratios["mem c/(a+F)"] = mc / (ma + feature_mib)
    if amp:
        ratios["AMP a"] = results["(a) student step, AMP"][0] / a
        ratios["AMP c"] = results["(c) MasKD step, AMP"][0] / c
    where = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    setup = (
        f"torch {torch.__version__}, {device} ({where}), {images} images {size}x{width}, "
        f"R{student_depth}-FPN student, R{teacher_depth}-FPN teacher, median of {repeats}"
    )
    return {"setup": setup, "cases": results, "ratios": ratios, "feature_mib": feature_mib}


def format_report(res) -> str:
    lines = [res["setup"], f"{'case':<30}{'seconds':>10}{'peak MiB':>11}"]
    for name, (secs, mib) in res["cases"].items():
        lines.append(f"{name:<30}{secs:>10.3f}{'n/a' if mib is None else f'{mib:.0f}':>11}")
    lines.append(f"F (teacher FPN feature maps)  {res['feature_mib']:>20.0f} MiB")
    for name, value in res["ratios"].items():
        goal = GOALS.get(name)
        verdict = (
            ""
            if goal is None
            else f"   (goal <= {goal:.2f}: {'met' if value <= goal else 'NOT met'})"
        )
        lines.append(f"{name:<14} = {value:.3f}{verdict}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=800, help="image height")
    parser.add_argument("--width", type=int, default=None, help="image width (default: --size)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="also (a) and (c) with AMP (CUDA)")
    parser.add_argument("--student-depth", type=int, default=18)
    parser.add_argument("--teacher-depth", type=int, default=50)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs --device cuda (detectron2's AMP is CUDA float16)")
    res = run_benchmark(
        args.size,
        args.width,
        args.images,
        args.repeats,
        args.device,
        args.amp,
        args.student_depth,
        args.teacher_depth,
    )
    print(format_report(res))
    if args.json:
        text = json.dumps(res, indent=1)
        atomic_write(args.json, lambda tmp: write_text(tmp, text), overwrite=True)
    return res


if __name__ == "__main__":
    main()
