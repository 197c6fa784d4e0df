#!/usr/bin/env python
"""The GPU check: both MasKD stages and the benchmarks on a CUDA device, one summary.

    python tools/gpu_check.py             # on a machine with CUDA (make gpu-check)
    python tools/gpu_check.py --dry-run   # the same code paths on CPU, tiny sizes (tested)

1. Generated data (demo/shapes.py, 128x128), a randomly initialised R34-FPN teacher saved as a
   checkpoint; stage 1 (tokens) and stage 2 (R18-FPN student, masked feature loss + RoI KD) each
   train a few iterations with MasKDTrainer, once in float32 and once with detectron2's AMP
   (SOLVER.AMP.ENABLED). Checked: every logged loss finite, the teacher bitwise unchanged, the
   trained parameters (tokens, student) changed.
2. tools/benchmark_step.py (with AMP rows) at detection size: Faster R-CNN R50-FPN student,
   R101-FPN teacher, 2 images of 800x1333; tools/benchmark_losses.py.

Exit status: 0 all checks passed, 1 a check failed, 3 no CUDA device (without --dry-run).
"""

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_NO_CUDA = 3
CONFIGS = os.path.join(ROOT, "configs", "Demo")


def generate_shapes(root: str, num_train: int, num_val: int) -> dict:
    """The demo's generated data (``demo/shapes.py --generate``): {split: (json, image folder)}."""
    script = os.path.join(ROOT, "demo", "shapes.py")
    cmd = [sys.executable, script, "--generate", root, "--num-train", str(num_train)]
    out = subprocess.run(cmd + ["--num-val", str(num_val)], check=True, capture_output=True)
    return {
        k: tuple(v) for k, v in json.loads(out.stdout.decode().strip().splitlines()[-1]).items()
    }


def _cfg(name, opts):
    from maskd.config import load_config

    return load_config(os.path.join(CONFIGS, name), opts)


def _state(module, skip=()):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(skip)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_stage(name, config, opts, checks):
    """Train one stage a few iterations; record what was checked in ``checks``."""
    from maskd.engine import MasKDTrainer

    cfg = _cfg(config, opts)
    trainer = MasKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    tokens = ("backbone.tokens.",)  # stage 1 keeps its (trained) tokens in the teacher's backbone
    teacher_before = _state(model.teacher, tokens)
    learned = model.student if hasattr(model, "student") else model.tokens
    learned_before = _state(learned)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = {
        k: v for r in records for k, v in r.items() if k.startswith("loss") or k == "total_loss"
    }
    checks[f"{name}: losses finite ({len(losses)} logged)"] = bool(losses) and all(
        math.isfinite(v) for v in losses.values()
    )
    checks[f"{name}: teacher unchanged"] = _same(teacher_before, _state(model.teacher, tokens))
    checks[f"{name}: trained parameters changed"] = not _same(learned_before, _state(learned))
    return cfg


def run_check(dry_run: bool, out: str) -> int:
    import benchmark_losses  # tools/benchmark_*.py, beside this script
    import benchmark_step
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    from maskd.engine import register_coco_datasets

    setup_logger(name="maskd")
    device = "cpu" if dry_run else "cuda"
    start = time.perf_counter()
    checks, lines = {}, []
    splits = generate_shapes(os.path.join(out, "data"), 8 if dry_run else 32, 4)
    register_coco_datasets([(f"gpu_check_{k}", *v) for k, v in splits.items()])
    data = ["DATASETS.TRAIN", "('gpu_check_train',)", "DATASETS.TEST", "()"]
    common = data + ["MODEL.DEVICE", device, "DATALOADER.NUM_WORKERS", "0"]
    iters = 2 if dry_run else 20

    torch.manual_seed(0)
    teacher_cfg = _cfg("shapes_teacher_R34.yaml", ["MODEL.DEVICE", device])
    teacher_file = os.path.join(out, "teacher.pth")
    torch.save({"model": build_model(teacher_cfg).state_dict()}, teacher_file)
    teacher = ["MODEL.MASKD.TEACHER.CONFIG_FILE", os.path.join(CONFIGS, "shapes_teacher_R34.yaml")]
    teacher += ["MODEL.MASKD.TEACHER.WEIGHTS", teacher_file]
    for amp in ([False] if dry_run else [False, True]):
        tag = "AMP" if amp else "fp32"
        solver = ["SOLVER.MAX_ITER", str(iters), "SOLVER.AMP.ENABLED", str(amp)]
        stage1_dir = os.path.join(out, f"tokens_{tag}")
        train_stage(
            f"stage 1 ({tag})",
            "maskd_shapes_R34-R18_tokens.yaml",
            common + teacher + solver + ["OUTPUT_DIR", stage1_dir],
            checks,
        )
        train_stage(
            f"stage 2 ({tag})",
            "maskd_shapes_R34-R18_2x.yaml",
            common
            + teacher
            + solver
            + ["SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0"]
            + ["MODEL.MASKD.CUSTOM_MASK_WARMUP", str(iters // 2)]
            + ["MODEL.MASKD.TOKENS_WEIGHTS", os.path.join(stage1_dir, "model_final.pth")]
            + ["OUTPUT_DIR", os.path.join(out, f"student_{tag}")],
            checks,
        )
    train_time = time.perf_counter() - start

    if dry_run:
        bench = dict(size=128, width=160, images=1, repeats=1, student_depth=18, teacher_depth=34)
    else:
        bench = dict(size=800, width=1333, images=2, repeats=3, student_depth=50, teacher_depth=101)
    try:
        res = benchmark_step.run_benchmark(device=device, amp=not dry_run, **bench)
        lines.append(benchmark_step.format_report(res))
        checks["step benchmark: every case timed"] = all(
            math.isfinite(s) and s > 0 for s, _ in res["cases"].values()
        )
        if not dry_run:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                benchmark_losses.main(["--device", device, "--repeats", "3"])
            lines.append(buf.getvalue().rstrip())
    except Exception:  # the summary is printed all the same
        checks["benchmarks ran"] = False
        lines.append(traceback.format_exc())

    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    summary = [f"MasKD GPU check on {where}, torch {torch.__version__}"]
    summary += [f"  [{'ok' if ok else 'FAILED'}] {name}" for name, ok in checks.items()]
    summary.append(
        f"  training checks {train_time:.0f} s, total {time.perf_counter() - start:.0f} s"
    )
    print("\n".join(summary + [""] + lines))
    return 0 if all(checks.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run the same code paths on CPU at tiny sizes"
    )
    parser.add_argument("--output", default="", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); "
            "nothing was run. --dry-run runs the same code paths on CPU.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        return run_check(args.dry_run, args.output)
    with tempfile.TemporaryDirectory() as out:
        return run_check(args.dry_run, out)


if __name__ == "__main__":
    sys.exit(main())
