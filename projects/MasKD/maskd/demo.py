"""The end-to-end demo: teacher, receptive tokens, baseline and MasKD students on CPU.

Every stage is a run of ``train_net.py`` with the configs in ``configs/Demo`` (so progress and
ETA come from detectron2's metric printer), on the procedural shapes dataset. The results are
read from each run's ``metrics.json`` and written to ``<output>/report.md`` with the receptive
masks and the loss curves.
"""

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

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


def _num(x: float, signed: bool = False) -> str:
    """A metric for the report; NaN (COCOEvaluator's value for a model without detections) -> n/a."""
    if math.isnan(x):
        return "n/a"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _json_safe(obj):
    """``obj`` with NaN floats replaced by None, so results.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _goal(name: str, threshold: float, better: Tuple[str, float], base: Tuple[str, float]) -> str:
    """One goal line: is ``better`` AP - ``base`` AP >= threshold; each is (model name, AP)."""
    missing = [model for model, ap in (better, base) if math.isnan(ap)]
    if missing:
        return f"{name}: NOT reached (undefined: no detections from the {' and '.join(missing)})"
    value = better[1] - base[1]
    return f"{name}: {'reached' if value >= threshold else 'NOT reached'} ({value:+.2f})"


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


def _retention(out_dir: str) -> float:
    """The retention (masked teacher AP / teacher AP) of a stage-1 run's last evaluation."""
    evals = [rec for rec in _records(out_dir) if "retention/bbox/AP" in rec]
    if not evals:
        raise RuntimeError(f"no retention in {os.path.join(out_dir, 'metrics.json')}")
    value = evals[-1]["retention/bbox/AP"]
    return math.nan if value is None else float(value)


def _token_statistics(out_dir: str) -> Dict[str, Dict[str, float]]:
    """level -> token statistics, as the last training record of a run logged them (each the
    median of the metric printer's window of 20 iterations)."""
    prefix = "[metric]tokens/"
    recs = [rec for rec in _records(out_dir) if any(k.startswith(prefix) for k in rec)]
    if not recs:
        raise RuntimeError(f"no token statistics in {os.path.join(out_dir, 'metrics.json')}")
    out: Dict[str, Dict[str, float]] = {}
    for key, value in recs[-1].items():
        if key.startswith(prefix):
            level, stat = key[len(prefix) :].split("/")
            out.setdefault(level, {})[stat] = value
    return out


def run_demo(
    root: str,
    output: str,
    quick: bool = False,
    seeds: int = 1,
    data_root: Optional[str] = None,
    reuse: bool = False,
    maskd_opts: Sequence[str] = (),
    teacher_seeds: int = 1,
    token_seeds: int = 1,
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
        teacher_seeds: how many teachers to train (seeds 0, 1, ...), each with its own tokens
            and MasKD students; the baseline students do not depend on the teacher and are
            trained once per seed. Several teachers emulate what another machine's numerics
            change.
        token_seeds: how many stage-1 runs (seeds 0, 1, ...) per teacher, to measure how
            reliably the tokens keep the teacher's accuracy; the students use seed 0's tokens.
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
    teacher_cfg = os.path.join(root, "configs", "Demo", "shapes_teacher_R34.yaml")

    baselines = {}
    for seed in range(seeds):
        common = _schedule(size["student_iter"]) + ["SEED", str(seed)]
        baselines[seed] = run.train(f"student_seed{seed}", "shapes_student_R18.yaml", common)
    teachers = {}
    for t in range(teacher_seeds):
        teacher_dir = run.train(
            f"teacher_t{t}",
            "shapes_teacher_R34.yaml",
            _schedule(size["teacher_iter"]) + ["SEED", str(t)],
        )
        teacher = [
            "MODEL.MASKD.TEACHER.CONFIG_FILE",
            teacher_cfg,
            "MODEL.MASKD.TEACHER.WEIGHTS",
            os.path.join(teacher_dir, "model_final.pth"),
        ]
        tokens = {
            k: run.train(
                f"tokens_t{t}_seed{k}",
                "maskd_shapes_R34-R18_tokens.yaml",
                teacher + ["SOLVER.MAX_ITER", str(size["tokens_iter"]), "SEED", str(k)],
            )
            for k in range(token_seeds)
        }
        maskd = {}
        for seed in range(seeds):
            common = _schedule(size["student_iter"]) + ["SEED", str(seed)]
            maskd[seed] = run.train(
                f"maskd_t{t}_seed{seed}",
                "maskd_shapes_R34-R18_2x.yaml",
                common
                + teacher
                + ["MODEL.MASKD.TOKENS_WEIGHTS", os.path.join(tokens[0], "model_final.pth")]
                + ["MODEL.MASKD.CUSTOM_MASK_WARMUP", str(size["student_iter"] // 2)]
                + list(maskd_opts),
            )
        teachers[t] = {"dir": teacher_dir, "opts": teacher, "tokens": tokens, "maskd": maskd}

    # The losses the MasKD students add to the baseline's (e.g. loss_maskd, loss_roi_reg_kd).
    distill = sorted(
        set.union(
            *(
                _loss_keys(d) - _loss_keys(baselines[seed])
                for tr in teachers.values()
                for seed, d in tr["maskd"].items()
            )
        )
    )
    results = {
        "distillation losses": distill,
        "maskd overrides": list(maskd_opts),
        "baseline": {s: _final_metrics(d) for s, d in baselines.items()},
        "teachers": {
            t: {
                "teacher": _final_metrics(tr["dir"]),
                "tokens": {
                    k: {
                        "masked teacher": _final_metrics(d),
                        "retention": _retention(d),
                        "token statistics": _token_statistics(d),
                    }
                    for k, d in tr["tokens"].items()
                },
                "maskd": {s: _final_metrics(d) for s, d in tr["maskd"].items()},
            }
            for t, tr in teachers.items()
        },
    }
    first = teachers[0]
    students = {s: {"baseline": baselines[s], "maskd": first["maskd"][s]} for s in baselines}
    _plots(root, output, teacher_cfg, first["opts"], first["tokens"][0], students, splits)
    total = time.perf_counter() - start
    report = _report(output, results, run.times, data_time, total, quick, size)
    with open(os.path.join(output, "results.json"), "w") as f:
        summary = {"results": results, "times": run.times, "total_s": total}
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
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


def _mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else math.nan


def _spread(values: List[float]) -> str:
    """mean, sample standard deviation and range of a list of numbers, for the report."""
    if any(math.isnan(v) for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f} ({min(values):+.2f} .. {max(values):+.2f})"


def _report(output, results, times, data_time, total, quick, size) -> str:
    teachers = results["teachers"]
    base_runs = results["baseline"]
    seeds = list(base_runs)
    base = {m: _mean(base_runs[s][m] for s in seeds) for m in METRICS}

    def maskd_mean(t, m):
        return _mean(teachers[t]["maskd"][s][m] for s in seeds)

    rows = []
    for t, tr in teachers.items():
        tag = f", teacher seed {t}" if len(teachers) > 1 else ""
        rows.append((f"teacher (R34-FPN){tag}", tr["teacher"]))
        rows.append((f"masked teacher (stage 1){tag}", tr["tokens"][0]["masked teacher"]))
    rows.append(("baseline student (R18-FPN)", base))
    for t in teachers:
        tag = f", teacher seed {t}" if len(teachers) > 1 else ""
        rows.append((f"MasKD student (R18-FPN){tag}", {m: maskd_mean(t, m) for m in METRICS}))
    lines = [
        "# MasKD demo report",
        "",
        f"Mode: {'QUICK (pipeline check only; the numbers mean nothing)' if quick else 'default'}."
        f" Dataset: procedural shapes, {size['n_train']} train / {size['n_val']} val images."
        f" {len(teachers)} teacher seed(s) x {len(seeds)} student seed(s); student rows are"
        " means over the student seeds.",
        "",
        "| model | AP | AP50 | AP75 | AP vs baseline student |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        cells = [_num(r[m]) for m in METRICS] + [_num(r["AP"] - base["AP"], signed=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(math.isnan(r[m]) for _, r in rows for m in METRICS):
        lines += [
            "",
            "n/a: no detections above the test score threshold on val, so COCO AP is undefined"
            " (detectron2's COCOEvaluator reports NaN; results.json has null).",
        ]
    overrides = " ".join(results["maskd overrides"]) or "none"
    lines += [
        "",
        "MasKD student: the baseline's losses plus "
        + ", ".join(f"`{k}`" for k in results["distillation losses"])
        + f" (configs/Demo/maskd_shapes_R34-R18_2x.yaml; extra overrides: {overrides}).",
        "",
        "## MasKD student minus baseline student, per teacher",
        "",
        "| teacher seed | teacher AP | baseline AP | MasKD AP | delta: mean ± sd (min .. max) |"
        " delta per student seed |",
        "|---|---|---|---|---|---|",
    ]
    deltas = {}
    for t, tr in teachers.items():
        deltas[t] = [tr["maskd"][s]["AP"] - base_runs[s]["AP"] for s in seeds]
        lines.append(
            f"| {t} | {_num(tr['teacher']['AP'])} | {_num(base['AP'])} | {_num(maskd_mean(t, 'AP'))}"
            f" | {_spread(deltas[t])} | "
            + ", ".join(_num(d, signed=True) for d in deltas[t])
            + " |"
        )
    lines += [
        "",
        "Per student seed (AP): "
        + "; ".join(
            f"seed {s}: baseline {_num(base_runs[s]['AP'])}, "
            + ", ".join(
                f"MasKD{f' (teacher {t})' if len(teachers) > 1 else ''}"
                f" {_num(tr['maskd'][s]['AP'])}"
                f" ({_num(tr['maskd'][s]['AP'] - base_runs[s]['AP'], signed=True)})"
                for t, tr in teachers.items()
            )
            for s in seeds
        ),
        "",
        "## Stage 1: retention and token statistics",
        "",
        "Retention = masked teacher AP / teacher AP (the stage-1 run evaluates both).",
        "",
        "| teacher seed | stage-1 seed | teacher AP | masked teacher AP | retention |",
        "|---|---|---|---|---|",
    ]
    for t, tr in teachers.items():
        for k, tok in tr["tokens"].items():
            lines.append(
                f"| {t} | {k} | {_num(tr['teacher']['AP'])} | {_num(tok['masked teacher']['AP'])}"
                f" | {_ratio(tok['retention'])} |"
            )
    stat_names = ["coverage", "constant", "dice", "weight_entropy", "combined"]
    lines += [
        "",
        "Token statistics of the tokens the students use (stage-1 seed 0), per level, from the"
        " last iterations of stage 1 (maskd.diagnostics: coverage = mean mask value; constant ="
        " share of masks with spatial std < 0.05; dice = mean Dice overlap between tokens;"
        " weight_entropy = token-weight entropy / log T; combined = mean of sum_t w_t M_t, the"
        " share of the features the teacher's heads see in stage 1).",
        "",
    ]
    for t, tr in teachers.items():
        lines += [
            f"Teacher seed {t}:",
            "",
            "| level | " + " | ".join(stat_names) + " |",
            "|---" * (len(stat_names) + 1) + "|",
        ]
        for level, st in tr["tokens"][0]["token statistics"].items():
            lines.append(
                f"| {level} | "
                + " | ".join(f"{st[k]:.3f}" if k in st else "-" for k in stat_names)
                + " |"
            )
        lines.append("")
    lines += ["## Goals", ""]
    for t, tr in teachers.items():
        tag = f"teacher seed {t}: " if len(teachers) > 1 else ""
        lines.append(
            "- "
            + tag
            + _goal(
                "teacher - baseline student >= 5 AP",
                5.0,
                ("teacher", tr["teacher"]["AP"]),
                ("baseline student", base["AP"]),
            )
        )
        lines.append(
            "- "
            + tag
            + _goal(
                "MasKD - baseline student >= +1.0 AP (mean over student seeds)",
                1.0,
                ("MasKD student", maskd_mean(t, "AP")),
                ("baseline student", base["AP"]),
            )
        )
        if any(math.isnan(d) for d in deltas[t]):
            lines.append(f"- {tag}MasKD > baseline on every seed: NOT reached (undefined AP)")
        else:
            ok = all(d > 0 for d in deltas[t])
            lines.append(
                f"- {tag}MasKD > baseline on every seed: {'reached' if ok else 'NOT reached'}"
                f" (smallest {min(deltas[t]):+.2f})"
            )
        ret = [tok["retention"] for tok in tr["tokens"].values()]
        ok = all(r >= 0.95 for r in ret)  # NaN fails
        lines.append(
            f"- {tag}retention >= 0.95 for every stage-1 seed: "
            f"{'reached' if ok else 'NOT reached'} ({', '.join(_ratio(r) for r in ret)})"
        )
    lines += [
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        f"| data generation / cache | {data_time:.0f} |",
    ]
    lines += [f"| {name} | {t:.0f} |" for name, t in times.items()]
    lines += [
        f"| total | {total:.0f} |",
        "",
        "Receptive masks of the learned tokens (teacher seed 0, stage-1 seed 0), with their"
        " statistics per level: `masks/`. Loss curves: `loss_curves.png`.",
        "",
    ]
    path = os.path.join(output, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"
