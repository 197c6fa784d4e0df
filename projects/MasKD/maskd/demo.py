"""The end-to-end demo: teacher, receptive tokens, baseline and MasKD students on CPU.

Every stage is a run of ``train_net.py`` with the configs in ``configs/Demo`` (so progress and
ETA come from detectron2's metric printer), on the procedural shapes dataset. The results are
read from each run's ``metrics.json`` and written to ``<output>/report.md`` with the receptive
masks and the loss curves.
"""

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["run_demo", "QUICK", "DEFAULT"]

logger = logging.getLogger(__name__)

# Sizes of a run: dataset, iterations of each stage, seeds of the students.
DEFAULT = dict(n_train=800, n_val=200, teacher_iter=1000, tokens_iter=100, student_iter=700)
QUICK = dict(n_train=48, n_val=16, teacher_iter=40, tokens_iter=10, student_iter=30)
METRICS = ("AP", "AP50", "AP75")


def _schedule(iters: int) -> List[str]:
    """Solver overrides for a shortened run: steps at 75% and 92%, warm-up within it."""
    steps = f"({int(iters * 0.75)}, {int(iters * 0.92)})"
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        steps,
        "SOLVER.WARMUP_ITERS",
        str(min(100, iters // 4)),
    ]


def _records(out_dir: str) -> List[dict]:
    """The records of a run's metrics.json (one dict per logged iteration or evaluation)."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _final_metrics(out_dir: str) -> Dict[str, float]:
    """The last evaluation in a run's metrics.json: {"AP": ..., "AP50": ..., "AP75": ...}."""
    evals = [rec for rec in _records(out_dir) if "bbox/AP" in rec]
    if not evals:
        raise RuntimeError(f"no bbox evaluation in {os.path.join(out_dir, 'metrics.json')}")
    return {m: evals[-1][f"bbox/{m}"] for m in METRICS}


def _loss_keys(out_dir: str) -> set:
    """Names of the losses a run logged in its metrics.json (``loss_*``)."""
    return {k for rec in _records(out_dir) for k in rec if k.startswith("loss_")}


def _curve(out_dir: str, key: str):
    """(iterations, values) of one logged scalar."""
    recs = [rec for rec in _records(out_dir) if key in rec]
    return [rec["iteration"] for rec in recs], [rec[key] for rec in recs]


class _Runner:
    def __init__(self, root: str, output: str, register: List[str], reuse: bool):
        self.root, self.output, self.register, self.reuse = root, output, register, reuse
        self.times: Dict[str, float] = {}

    def train(self, name: str, config: str, opts: List[str]) -> str:
        out_dir = os.path.join(self.output, name)
        if self.reuse and os.path.isfile(os.path.join(out_dir, "model_final.pth")):
            logger.info("[demo] %s: reusing the finished run in %s", name, out_dir)
            return out_dir
        cmd = [sys.executable, os.path.join(self.root, "train_net.py"), "--config-file"]
        cmd += [os.path.join(self.root, "configs", "Demo", config), *self.register]
        cmd += [*opts, "OUTPUT_DIR", out_dir]
        logger.info("[demo] %s: %s", name, " ".join(cmd))
        start = time.perf_counter()
        subprocess.run(cmd, cwd=self.root, check=True)
        self.times[name] = time.perf_counter() - start
        return out_dir


def run_demo(
    root: str,
    output: str,
    quick: bool = False,
    seeds: int = 1,
    data_root: Optional[str] = None,
    reuse: bool = False,
    maskd_opts: Sequence[str] = (),
) -> str:
    """Run the whole demo and write ``<output>/report.md``; returns its path.

    Args:
        root: the repository (where train_net.py and configs/ are).
        output: the folder for every run and the report.
        quick: a tiny run that proves the pipeline (about 3 minutes), not accuracy.
        seeds: how many seeds to train the baseline and MasKD students with.
        data_root: where the generated dataset is cached (default ``<root>/datasets/shapes``).
        reuse: do not rerun a stage whose run in ``output`` has finished (its wall time is
            then missing from the report).
        maskd_opts: extra config overrides of the MasKD students (e.g. a loss weight to try).
    """
    from .synthetic import shapes_dataset

    size = QUICK if quick else DEFAULT
    start = time.perf_counter()
    splits = shapes_dataset(
        data_root or os.path.join(root, "datasets", "shapes"), size["n_train"], size["n_val"]
    )
    register = []
    for split, (json_file, image_dir) in splits.items():
        register += ["--register-coco", f"maskd_shapes_{split}", json_file, image_dir]
    data_time = time.perf_counter() - start
    run = _Runner(root, output, register, reuse)

    teacher_dir = run.train("teacher", "shapes_teacher_R34.yaml", _schedule(size["teacher_iter"]))
    teacher_cfg = os.path.join(root, "configs", "Demo", "shapes_teacher_R34.yaml")
    teacher = [
        "MODEL.MASKD.TEACHER.CONFIG_FILE",
        teacher_cfg,
        "MODEL.MASKD.TEACHER.WEIGHTS",
        os.path.join(teacher_dir, "model_final.pth"),
    ]
    tokens_dir = run.train(
        "tokens",
        "maskd_shapes_R34-R18_tokens.yaml",
        teacher + ["SOLVER.MAX_ITER", str(size["tokens_iter"])],
    )
    students = {}
    for seed in range(seeds):
        common = _schedule(size["student_iter"]) + ["SEED", str(seed)]
        warmup = str(size["student_iter"] // 2)
        students[seed] = {
            "baseline": run.train(f"student_seed{seed}", "shapes_student_R18.yaml", common),
            "maskd": run.train(
                f"maskd_seed{seed}",
                "maskd_shapes_R34-R18_2x.yaml",
                common
                + teacher
                + ["MODEL.MASKD.TOKENS_WEIGHTS", os.path.join(tokens_dir, "model_final.pth")]
                + ["MODEL.MASKD.CUSTOM_MASK_WARMUP", warmup, *maskd_opts],
            ),
        }

    # The losses the MasKD students add to the baseline's (e.g. loss_maskd, loss_roi_reg_kd).
    distill = sorted(
        set.union(*(_loss_keys(r["maskd"]) - _loss_keys(r["baseline"]) for r in students.values()))
    )
    results = {
        "distillation losses": distill,
        "maskd overrides": list(maskd_opts),
        "teacher": _final_metrics(teacher_dir),
        "masked teacher": _final_metrics(tokens_dir),
        "seeds": {
            s: {k: _final_metrics(d) for k, d in runs.items()} for s, runs in students.items()
        },
    }
    _plots(root, output, teacher_cfg, teacher, tokens_dir, students, splits)
    total = time.perf_counter() - start
    report = _report(output, results, run.times, data_time, total, quick, size)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump({"results": results, "times": run.times, "total_s": total}, f, indent=1)
    logger.info("[demo] report: %s", report)
    return report


def _plots(root, output, teacher_cfg, teacher_opts, tokens_dir, students, splits):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, runs in students.items():
        for kind, style in (("baseline", "-"), ("maskd", "--")):
            xs, ys = _curve(runs[kind], "total_loss")
            ax.plot(xs, ys, style, label=f"{kind} student, seed {seed} (total loss)")
        xs, ys = _curve(runs["maskd"], "loss_maskd")
        ax.plot(xs, ys, ":", label=f"loss_maskd, seed {seed}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss_curves.png"), dpi=90)
    plt.close(fig)

    cmd = [sys.executable, os.path.join(root, "tools", "visualize_masks.py")]
    cmd += [
        "--config-file",
        os.path.join(root, "configs", "Demo", "maskd_shapes_R34-R18_tokens.yaml"),
    ]
    cmd += ["--checkpoint", os.path.join(tokens_dir, "model_final.pth")]
    cmd += [
        "--dataset",
        "maskd_shapes_val",
        "--num",
        "2",
        "--output",
        os.path.join(output, "masks"),
    ]
    cmd += ["--register-coco", "maskd_shapes_val", *splits["val"], *teacher_opts]
    subprocess.run(cmd, cwd=root, check=True)


def _report(output, results, times, data_time, total, quick, size) -> str:
    seeds = results["seeds"]

    def mean(kind, m):
        return statistics.mean(seeds[s][kind][m] for s in seeds)

    base = {m: mean("baseline", m) for m in METRICS}
    rows = [
        ("teacher (R34-FPN)", results["teacher"]),
        ("masked teacher (stage 1)", results["masked teacher"]),
        ("baseline student (R18-FPN)", base),
        ("MasKD student (R18-FPN)", {m: mean("maskd", m) for m in METRICS}),
    ]
    lines = [
        "# MasKD demo report",
        "",
        f"Mode: {'QUICK (pipeline check only; the numbers mean nothing)' if quick else 'default'}."
        f" Dataset: procedural shapes, {size['n_train']} train / {size['n_val']} val images."
        f" Students: mean over {len(seeds)} seed(s).",
        "",
        "| model | AP | AP50 | AP75 | AP vs baseline student |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        delta = r["AP"] - base["AP"]
        lines.append(
            f"| {name} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | {delta:+.2f} |"
        )
    overrides = " ".join(results["maskd overrides"]) or "none"
    lines += [
        "",
        "MasKD student: the baseline's losses plus "
        + ", ".join(f"`{k}`" for k in results["distillation losses"])
        + f" (configs/Demo/maskd_shapes_R34-R18_2x.yaml; extra overrides: {overrides}).",
    ]
    lines += [
        "",
        "Per seed (AP): "
        + ", ".join(
            f"seed {s}: baseline {seeds[s]['baseline']['AP']:.2f}, MasKD {seeds[s]['maskd']['AP']:.2f}"
            f" ({seeds[s]['maskd']['AP'] - seeds[s]['baseline']['AP']:+.2f})"
            for s in seeds
        ),
    ]
    gap = results["teacher"]["AP"] - base["AP"]
    gain = mean("maskd", "AP") - base["AP"]
    lines += [
        "",
        "Goals: teacher - baseline student >= 5 AP: "
        + ("reached" if gap >= 5 else "NOT reached")
        + f" ({gap:+.2f}); MasKD - baseline student >= +1.0 AP (mean over seeds): "
        + ("reached" if gain >= 1.0 else "NOT reached")
        + f" ({gain:+.2f}).",
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        f"| data generation / cache | {data_time:.0f} |",
    ]
    lines += [f"| {name} | {t:.0f} |" for name, t in times.items()]
    lines += [
        f"| total | {total:.0f} |",
        "",
        "Receptive masks of the learned tokens: `masks/`. Loss curves: `loss_curves.png`.",
        "",
    ]
    path = os.path.join(output, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
