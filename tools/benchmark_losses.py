#!/usr/bin/env python
"""Time and peak memory of the MasKD losses against the plain (published-style) formulation.

Both run side by side in one process, at detection shapes: N=2 images, C=256 channels, T=6
tokens, the FPN levels P2-P6 of an 800x1344 input. Measured per configuration: forward+backward
of the stage-2 loss (masked distillation; the student requires grad, masks and weights come
from frozen tokens) and of the stage-1 losses (masked aggregate + Dice; masks and weights require
grad). Masks and weights are computed once beforehand: they are the losses' inputs. Peak memory
(tools/measure.py): on CPU the rise of the process's peak resident set (Linux VmHWM, reset before
each measurement) over the resident set before it; on CUDA the rise of max_memory_allocated.

    python tools/benchmark_losses.py [--repeats 3] [--device cuda]
"""

import argparse

import torch
from measure import measure  # tools/measure.py, beside this script

from maskd.modeling.losses import dice_diversity_loss, masked_aggregate, masked_distillation_loss
from maskd.modeling.receptive_tokens import ReceptiveTokens
from maskd.modeling.reference import (  # the plain (literal) formulation
    naive_dice_diversity_loss,
    naive_mask_features,
    naive_masked_distillation_loss,
)

STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32, "P6": 64}


def level_shape(level, height=800, width=1344):
    s = STRIDES[level]
    return (height + s - 1) // s, (width + s - 1) // s


def make_inputs(levels, n=2, c=256, t=6, seed=0, device="cpu"):
    """Per level: teacher and student features (N, C, H, W), masks (N, T, H, W) and weights
    (N, T) from real receptive tokens (computed once: they are the losses' inputs)."""
    torch.manual_seed(seed)
    feats = []
    for level in levels:
        h, w = level_shape(level)
        rt = ReceptiveTokens(c, t, weighted=True).to(device)
        teacher = torch.randn(n, c, h, w, device=device)
        with torch.no_grad():
            masks, weights = rt.masks(teacher), rt.weights(teacher)
        feats.append((teacher, torch.randn(n, c, h, w, device=device), masks, weights))
    return feats


def stage2_step(feats, loss_fn):
    """Distillation: the student (through its align conv) requires grad; masks are frozen."""
    total = 0.0
    for teacher, student_data, masks, weights in feats:
        student = student_data.detach().requires_grad_()
        loss = loss_fn(student, teacher, masks, weights)
        loss.backward()
        total += loss.item()
    return total


def stage1_step(feats, aggregate_fn, dice_fn):
    """Token learning: masks and weights require grad (through the tokens), the teacher not.
    The sum of the aggregate stands in for the teacher's task loss on it."""
    total = 0.0
    for teacher, _, masks_data, weights_data in feats:
        masks = masks_data.detach().requires_grad_()
        weights = weights_data.detach().requires_grad_()
        loss = aggregate_fn(teacher, masks, weights).sum() + dice_fn(masks)
        loss.backward()
        total += loss.item()
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"{torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {args.device} ({where}), N=2 C=256 T=6, 800x1344")
    header = (
        f"{'case':<22}{'ours s':>9}{'plain s':>9}{'time ratio':>12}"
        f"{'ours MiB':>10}{'plain MiB':>11}{'mem ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, levels in [("P2", ["P2"]), ("P2-P6", list(STRIDES))]:
        feats = make_inputs(levels, device=args.device)
        for stage, ours_fn, plain_fn in [
            (
                "distill",
                lambda: stage2_step(feats, masked_distillation_loss),
                lambda: stage2_step(feats, naive_masked_distillation_loss),
            ),
            (
                "tokens",
                lambda: stage1_step(feats, masked_aggregate, dice_diversity_loss),
                lambda: stage1_step(feats, naive_mask_features, naive_dice_diversity_loss),
            ),
        ]:
            ours_val, plain_val = ours_fn(), plain_fn()
            if abs(ours_val - plain_val) > 1e-4 * abs(plain_val):
                raise RuntimeError(f"values differ: ours {ours_val}, plain {plain_val}")
            t_o, m_o = measure(ours_fn, args.repeats, args.device)
            t_p, m_p = measure(plain_fn, args.repeats, args.device)
            print(
                f"{stage + ' ' + name:<22}{t_o:>9.3f}{t_p:>9.3f}{t_o / t_p:>12.3f}"
                f"{m_o:>10.0f}{m_p:>11.0f}{m_o / m_p:>11.3f}"
            )
        del feats


if __name__ == "__main__":
    main()
