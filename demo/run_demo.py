#!/usr/bin/env python
"""MasKD end to end on CPU: train a teacher on generated shapes, distil a student from it with
the pipeline of ``distill_net.py`` (tokens, student, export, evaluation), train the same student
without distillation, and write ``<output>/report.md``.

    python demo/run_demo.py            # the default run (output/demo)
    python demo/run_demo.py --quick    # a tiny run that checks the pipeline (numbers mean nothing)
    python demo/run_demo.py --seeds 3  # the students with 3 seeds
    python demo/run_demo.py --teacher-seeds 2 --seeds 3 --token-seeds 3
                                       # the perturbation benchmark: 2 teachers x 3 student
                                       # seeds, 3 stage-1 seeds per teacher (retention)

Finished stages are kept, as in the pipeline: running the command again resumes an interrupted
demo; --fresh deletes the output folder first.

Folders under the output: ``student_seed<s>/`` (baseline students), ``teacher_t<t>/``,
``maskd_t<t>_seed<s>/`` (one distill_net.py pipeline each: ``tokens/`` for seed 0, whose tokens
the other seeds reuse, ``student/``, ``export/``, ``evaluate/``), ``tokens_t<t>_seed<k>/``
(the extra stage-1 runs of --token-seeds).
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import report as rep  # noqa: E402  (demo/report.py and demo/shapes.py, beside this script)
from shapes import VARIANTS, foreground_statistics, shapes_dataset  # noqa: E402

from maskd.engine.pipeline import STAGES, StageRunner, run_pipeline  # noqa: E402
from maskd.modeling.mask_sources import mask_source_class  # noqa: E402
from maskd.utils.files import atomic_write, write_text  # noqa: E402

logger = logging.getLogger("maskd.demo")

CONFIGS = os.path.join(ROOT, "configs", "Demo")
TEACHER_CFG = os.path.join(CONFIGS, "shapes_teacher_R34.yaml")
STUDENT_CFG = os.path.join(CONFIGS, "shapes_student_R18.yaml")
TOKENS_CFG = os.path.join(CONFIGS, "maskd_shapes_R34-R18_tokens.yaml")
MASKD_CFG = os.path.join(CONFIGS, "maskd_shapes_R34-R18_2x.yaml")
# Every run of the demo is evaluated on the test split (the configs' DATASETS.TEST is val, on
# which choices are made).
TEST_OPTS = ["DATASETS.TEST", '("maskd_shapes_test",)']


# The mask sources of the ablation (MODEL.MASKD.MASK_SOURCE) and "tokens_variant": tokens
# learned with other stage-1 settings (--variant-opts, e.g. the partition objective), used as
# "tokens". gt_boxes, gt_partition and gt_instances are oracles (the ground truth's regions).
ABLATION = ("tokens", "uniform", "gt_boxes", "gt_partition", "gt_instances", "random_tokens")
# The students of the ablation distil features only: the RoI box-regression KD is off.
FEATURE_ONLY = ["MODEL.MASKD.ROI_REG_KD.WEIGHT", "0.0"]
# The ablation's students are evaluated on val (where choices are made: is there headroom?)
# and on test (what is reported).
VAL_AND_TEST = ["DATASETS.TEST", '("maskd_shapes_val", "maskd_shapes_test")']


def run_demo(
    output: str,
    quick: bool = False,
    seeds: int = 1,
    data_root: Optional[str] = None,
    fresh: bool = False,
    maskd_opts: Sequence[str] = (),
    teacher_seeds: int = 1,
    token_seeds: int = 1,
    sources: Sequence[str] = (),
    variant_opts: Sequence[str] = (),
    jobs: int = 1,
    data: str = "default",
    full_sources: Sequence[str] = (),
) -> str:
    """Run the whole demo and write ``<output>/report.md``; returns its path.

    Args:
        output: the folder for every run and the report.
        quick: a tiny run that proves the pipeline (a few minutes), not accuracy.
        seeds: how many seeds to train the baseline and MasKD students with.
        data_root: where the generated dataset is cached (default ``<root>/datasets/shapes``).
        fresh: delete ``output`` first (else finished stages are kept; their wall time in the
            report is the one their first run measured).
        maskd_opts: extra config overrides of the MasKD students (e.g. a loss weight to try).
        teacher_seeds: how many teachers to train (seeds 0, 1, ...), each with its own tokens
            and MasKD students; the baseline students do not depend on the teacher and are
            trained once per seed. Several teachers emulate what another machine's numerics
            change.
        token_seeds: how many stage-1 runs (seeds 0, 1, ...) per teacher, to measure how
            reliably the tokens keep the teacher's accuracy; the students use seed 0's tokens.
        sources: the mask-source ablation: for each teacher and student seed, a student that
            distils features only (RoI KD off) with each of these mask sources (a subset of
            :data:`ABLATION`, or "tokens_variant": tokens learned with ``variant_opts``).
        variant_opts: with "tokens_variant" in ``sources``, config overrides (``KEY VALUE``) of
            the variant's stage-1 runs and of its students, e.g. ``MODEL.MASKD.WEIGHTED False``
            or ``MODEL.MASKD.AREA_WEIGHT 0.05``.
        jobs: how many training runs at a time (each then on one thread).
        data: the scenes of the generated data (``demo/shapes.py``: "default", "small": many
            small objects, or "detection": detection-like scenes); use an output folder per
            variant.
        full_sources: the full recipe (masked features and RoI box-regression KD) through other
            mask sources than the paper's tokens (e.g. "uniform", "tokens_variant"): for each
            teacher and student seed one student per source, evaluated on val and test, to
            compare with the MasKD students seed by seed.
    """
    if fresh and os.path.isdir(output):
        logger.info("[demo] --fresh: removing %s", output)
        shutil.rmtree(output)
    unknown = [x for x in (*sources, *full_sources) if x not in ABLATION + ("tokens_variant",)]
    needs_variant = "tokens_variant" in sources or "tokens_variant" in full_sources
    if unknown or (needs_variant and not variant_opts):
        raise ValueError(
            f"unknown mask sources {unknown} (known: {list(ABLATION) + ['tokens_variant']})"
            if unknown
            else "'tokens_variant' needs --variant-opts"
        )
    if jobs > 1:  # several runs at a time, each on one core
        os.environ["OMP_NUM_THREADS"] = "1"
    size = rep.QUICK if quick else rep.DEFAULT
    start = time.perf_counter()
    splits = shapes_dataset(
        data_root or os.path.join(ROOT, "datasets", "shapes"),
        size["n_train"],
        size["n_val"],
        num_test=size["n_test"],
        variant=data,
    )
    register = []
    for split, (json_file, image_dir) in splits.items():
        register += ["--register-coco", f"maskd_shapes_{split}", json_file, image_dir]
    data_time = time.perf_counter() - start
    runner = StageRunner(register)
    student_schedule = rep.schedule(size["student_iter"])
    pool = ThreadPoolExecutor(max_workers=jobs)

    def in_parallel(tasks: Dict):
        """Run the callables of ``tasks`` (at most ``jobs`` at a time); their results."""
        futures = {k: pool.submit(fn) for k, fn in tasks.items()}
        return {k: f.result() for k, f in futures.items()}

    def train(name, config, opts):
        out_dir = os.path.join(os.path.abspath(output), name)
        args = ["--config-file", config, *opts, *TEST_OPTS, "OUTPUT_DIR", out_dir]
        return lambda: runner.run(name, out_dir, args)

    # the teachers first: stage 1 waits for them, not for the baselines
    first_runs = {
        ("teacher", t): train(
            f"teacher_t{t}", TEACHER_CFG, rep.schedule(size["teacher_iter"]) + ["SEED", str(t)]
        )
        for t in range(teacher_seeds)
    }
    for s in range(seeds):
        first_runs[("baseline", s)] = train(
            f"student_seed{s}", STUDENT_CFG, student_schedule + ["SEED", str(s)]
        )
    done = in_parallel(first_runs)
    baselines = {s: done[("baseline", s)] for s in range(seeds)}
    tokens_opts = ["SOLVER.MAX_ITER", str(size["tokens_iter"])]
    maskd_opts_all = student_schedule + [
        "MODEL.MASKD.CUSTOM_MASK_WARMUP",
        str(size["student_iter"] // 2),
    ]

    def pipeline(t, folder, stages, tokens_seed=0, extra_tokens=(), student=(), weights=""):
        teacher_dir = done[("teacher", t)]
        return lambda: run_pipeline(
            os.path.join(output, folder),
            TOKENS_CFG,
            MASKD_CFG,
            opts=TEST_OPTS,
            tokens_opts=tokens_opts + ["SEED", str(tokens_seed), *extra_tokens],
            student_opts=list(student),
            tokens_weights=weights,
            stages=stages,
            runner=runner,
            teacher_config=TEACHER_CFG,
            teacher_weights=os.path.join(teacher_dir, "model_final.pth"),
        )

    # stage 1: each teacher's tokens (seed 0's for the students, more seeds for retention)
    stage1 = {}
    for t in range(teacher_seeds):
        stage1[(t, 0)] = pipeline(t, f"maskd_t{t}_seed0", ("tokens",))
        for k in range(1, token_seeds):
            stage1[(t, k)] = pipeline(t, f"tokens_t{t}_seed{k}", ("tokens",), tokens_seed=k)
        if needs_variant:  # as many stage-1 seeds, for the retention
            for k in range(token_seeds):
                stage1[(t, "variant", k)] = pipeline(
                    t,
                    f"tokens_variant_t{t}_seed{k}",
                    ("tokens",),
                    tokens_seed=k,
                    extra_tokens=variant_opts,
                )
    stage1 = in_parallel(stage1)

    def tokens_file(t, *k):
        return stage1[(t, *k)]["stages"]["tokens"]["checkpoint"]

    def tokens_dir(t, *k):
        return stage1[(t, *k)]["stages"]["tokens"]["dir"]

    # stage 2: the full recipe through the whole pipeline, and the ablation's students
    def source_student(t, s, opts, source, kind, folder):
        """A stage-2 run of teacher t, seed s, through a mask source, on val and test."""
        variant = source == "tokens_variant"
        src = "tokens" if variant else source
        opts_src = opts + ["MODEL.MASKD.MASK_SOURCE", src] + VAL_AND_TEST
        if not mask_source_class(src).CUSTOMISABLE:  # e.g. uniform, the oracles
            opts_src += ["MODEL.MASKD.CUSTOM_MASK_WARMUP", "-1"]
        if variant:
            opts_src += list(variant_opts)
        weights = tokens_file(t, "variant", 0) if variant else tokens_file(t, 0)
        students[(kind, t, s, source)] = pipeline(
            t, folder, ("student",), student=opts_src, weights=weights
        )

    # in the order they run: the features-only students of sources without learned tokens (the
    # oracles' headroom comes first), the full recipe, the features-only students of tokens
    students = {}
    learned = ("tokens", "tokens_variant", "random_tokens")
    for phase in ("fixed sources", "full recipe", "learned sources"):
        for t in range(teacher_seeds):
            for s in range(seeds):
                opts = maskd_opts_all + ["SEED", str(s)] + list(maskd_opts)
                if phase == "full recipe":
                    students[("maskd", t, s)] = pipeline(
                        t,
                        f"maskd_t{t}_seed{s}",
                        STAGES[1:],
                        student=opts + VAL_AND_TEST,
                        weights=tokens_file(t, 0),
                    )
                    for source in full_sources:
                        folder = f"full_t{t}_{source}_seed{s}"
                        source_student(t, s, opts, source, "full", folder)
                    continue
                for source in sources:  # features only
                    if (source in learned) == (phase == "learned sources"):
                        folder = f"ablation_t{t}_{source}_seed{s}"
                        source_student(t, s, opts + FEATURE_ONLY, source, "ablation", folder)
    students = in_parallel(students)
    pool.shutdown()

    teachers = {}
    for t in range(teacher_seeds):
        tokens = {k: tokens_dir(t, k) for k in range(token_seeds)}
        teachers[t] = {
            "dir": done[("teacher", t)],
            "tokens": tokens,
            "maskd": {s: students[("maskd", t, s)] for s in range(seeds)},
            "ablation": {
                src: {s: students[("ablation", t, s, src)] for s in range(seeds)} for src in sources
            },
            "full": {
                src: {s: students[("full", t, s, src)] for s in range(seeds)}
                for src in full_sources
            },
        }
        if needs_variant:
            teachers[t]["tokens_variant"] = {
                k: tokens_dir(t, "variant", k) for k in range(token_seeds)
            }

    # The losses the MasKD students add to the baseline's (e.g. loss_maskd, loss_roi_reg_kd).
    distill = set()
    for tr in teachers.values():
        for s, p in tr["maskd"].items():
            distill |= rep.loss_keys(p["stages"]["student"]["dir"]) - rep.loss_keys(baselines[s])
    results = {
        "data": {"variant": data, "val": foreground_statistics(splits["val"][0])},
        "distillation losses": sorted(distill),
        "maskd overrides": list(maskd_opts),
        "variant overrides": list(variant_opts),
        "baseline": {s: rep.final_metrics(d) for s, d in baselines.items()},
        "teachers": {t: teacher_results(tr) for t, tr in teachers.items()},
    }
    first = teachers[0]
    curves = {
        s: {"baseline": baselines[s], "maskd": first["maskd"][s]["stages"]["student"]["dir"]}
        for s in baselines
    }
    plots(output, first["tokens"][0], curves, splits)
    total = time.perf_counter() - start
    times = stage_times(output, baselines, teachers)
    path = rep.write_report(output, results, times, data_time, total, quick, size)
    summary = {"results": results, "times": times, "total_s": total}
    text = json.dumps(rep.json_safe(summary), indent=1, allow_nan=False)
    atomic_write(os.path.join(output, "results.json"), lambda tmp: write_text(tmp, text), True)
    logger.info("[demo] report: %s", path)
    return path


def teacher_results(tr) -> dict:
    """One teacher's numbers for the report: its AP, its stage-1 runs, its students."""
    out = {
        "teacher": rep.final_metrics(tr["dir"]),
        "tokens": {k: stage1_results(d) for k, d in tr["tokens"].items()},
        # the released student, evaluated by plain detectron2 (the pipeline's last stage)
        "maskd": {
            s: rep.evaluated_metrics(p["stages"]["evaluate"]["results"], "maskd_shapes_test")
            for s, p in tr["maskd"].items()
        },
        "maskd in training": {
            s: rep.final_metrics(p["stages"]["student"]["dir"], "maskd_shapes_test")
            for s, p in tr["maskd"].items()
        },
        "maskd val": {
            s: rep.final_metrics(p["stages"]["student"]["dir"], "maskd_shapes_val")
            for s, p in tr["maskd"].items()
        },
        # the ablation's students: their own final evaluation (no export), test and val
        "ablation": {
            src: {
                s: rep.final_metrics(p["stages"]["student"]["dir"], "maskd_shapes_test")
                for s, p in runs.items()
            }
            for src, runs in tr["ablation"].items()
        },
        "ablation val": {
            src: {
                s: rep.final_metrics(p["stages"]["student"]["dir"], "maskd_shapes_val")
                for s, p in runs.items()
            }
            for src, runs in tr["ablation"].items()
        },
    }
    for kind in ("full",):  # the full recipe through other sources, test and val
        for key, dataset in ((kind, "maskd_shapes_test"), (f"{kind} val", "maskd_shapes_val")):
            out[key] = {
                src: {
                    s: rep.final_metrics(p["stages"]["student"]["dir"], dataset)
                    for s, p in runs.items()
                }
                for src, runs in tr[kind].items()
            }
    if "tokens_variant" in tr:
        out["tokens_variant"] = {k: stage1_results(d) for k, d in tr["tokens_variant"].items()}
    return out


def stage1_results(out_dir) -> dict:
    return {
        "masked teacher": rep.final_metrics(out_dir),
        "retention": rep.retention_of(out_dir),
        "token statistics": rep.token_statistics_of(out_dir),
    }


def stage_times(output, baselines, teachers) -> Dict[str, float]:
    """Wall time of every training stage, as its marker recorded it (stages kept from an
    earlier run keep the time of the run that made them)."""
    dirs = {os.path.basename(d): d for d in baselines.values()}
    for t, tr in teachers.items():
        dirs[f"teacher_t{t}"] = tr["dir"]
        for k, d in tr["tokens"].items():
            dirs[f"tokens_t{t}_seed{k}"] = d
        for s, p in tr["maskd"].items():
            dirs[f"maskd_t{t}_seed{s}"] = p["stages"]["student"]["dir"]
            for stage in ("export", "evaluate"):
                dirs[f"maskd_t{t}_seed{s} {stage}"] = p["stages"][stage]["dir"]
        for k, d in tr.get("tokens_variant", {}).items():
            dirs[f"tokens_variant_t{t}_seed{k}"] = d
        for kind in ("ablation", "full"):
            for src, runs in tr[kind].items():
                for s, p in runs.items():
                    dirs[f"{kind}_t{t}_{src}_seed{s}"] = p["stages"]["student"]["dir"]
    return {name: StageRunner.finished(d)["seconds"] for name, d in dirs.items()}


def plots(output, tokens_dir, students, splits):
    """The loss curves of the students and the receptive masks of the first tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, runs in students.items():
        for kind, style in (("baseline", "-"), ("maskd", "--")):
            xs, ys = rep.curve(runs[kind], "total_loss")
            ax.plot(xs, ys, style, label=f"{kind} student, seed {seed} (total loss)")
        xs, ys = rep.curve(runs["maskd"], "loss_maskd")
        ax.plot(xs, ys, ":", label=f"loss_maskd, seed {seed}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss_curves.png"), dpi=90)
    plt.close(fig)

    # the stage-1 run's own config (teacher and overrides included) describes the model
    cmd = [sys.executable, os.path.join(ROOT, "tools", "visualize_masks.py")]
    cmd += ["--config-file", os.path.join(tokens_dir, "config.yaml")]
    cmd += ["--checkpoint", os.path.join(tokens_dir, "model_final.pth")]
    cmd += ["--dataset", "maskd_shapes_val", "--num", "2", "--output"]
    cmd += [os.path.join(output, "masks"), "--register-coco", "maskd_shapes_val", *splits["val"]]
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=1, help="student seeds")
    parser.add_argument(
        "--teacher-seeds", type=int, default=1, help="teachers (each with tokens and students)"
    )
    parser.add_argument("--token-seeds", type=int, default=1, help="stage-1 runs per teacher")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "datasets", "shapes"))
    parser.add_argument("--fresh", action="store_true", help="delete --output first")
    parser.add_argument(
        "--maskd-opts", nargs="*", default=[], help="overrides of the MasKD students"
    )
    parser.add_argument(
        "--sources",
        nargs="*",
        default=[],
        help=f"the mask-source ablation: feature-only students with each of {list(ABLATION)} "
        "(and tokens_variant: tokens learned with --variant-opts)",
    )
    parser.add_argument(
        "--full-sources",
        nargs="*",
        default=[],
        help="the full recipe through other mask sources than the paper's tokens (e.g. uniform "
        "tokens_variant), compared with the MasKD students seed by seed",
    )
    parser.add_argument(
        "--variant-opts",
        nargs="*",
        default=[],
        help="overrides of the stage-1 runs and students of tokens_variant",
    )
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    parser.add_argument(
        "--data",
        default="default",
        choices=sorted(VARIANTS),
        help="the scenes of the generated data (small: many small objects; detection: "
        "detection-like scenes)",
    )
    args = parser.parse_args(argv)
    setup_logger(name="maskd")
    path = run_demo(
        args.output,
        quick=args.quick,
        seeds=args.seeds,
        data_root=args.data_root,
        fresh=args.fresh,
        maskd_opts=args.maskd_opts,
        teacher_seeds=args.teacher_seeds,
        token_seeds=args.token_seeds,
        sources=args.sources,
        variant_opts=args.variant_opts,
        jobs=args.jobs,
        data=args.data,
        full_sources=args.full_sources,
    )
    with open(path) as f:
        print(f.read())


if __name__ == "__main__":
    main()
