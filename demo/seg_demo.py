#!/usr/bin/env python
"""The paper's segmentation recipe end to end on CPU: a semantic FPN teacher trained on the
shapes data's label maps, receptive tokens learned on its output logits (stage 1), students
distilled on their logits through those tokens (stage 2, with the pipeline of
``distill_net.py``: tokens, student, export, evaluation), the same students trained without
distillation, and ``<output>/report.md`` with every student seed paired.

    python demo/seg_demo.py                # 1 teacher, 6 student seeds (output/seg_demo)
    python demo/seg_demo.py --quick        # a tiny run that checks the pipeline
    python demo/seg_demo.py --seeds 3 --jobs 2

Folders under the output: ``teacher/``, ``student_seed<s>/`` (baselines), ``maskd_seed<s>/``
(one pipeline each: ``tokens/`` for seed 0, whose tokens the other seeds reuse, ``student/``,
``export/``, ``evaluate/``). Finished stages are kept: the command resumes an interrupted demo.
Every training run imports ``demo/seg_data.py`` (``--import``), which registers the splits.
"""

import argparse
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import report as rep  # noqa: E402  (demo/report.py and demo/shapes.py, beside this script)
from shapes import CLASSES, SEM_IGNORE, shapes_dataset  # noqa: E402

from maskd.engine.pipeline import STAGES, StageRunner, run_pipeline  # noqa: E402
from maskd.utils.files import atomic_write, write_text  # noqa: E402

logger = logging.getLogger("maskd.demo")

CONFIGS = os.path.join(ROOT, "configs", "Demo")
TEACHER_CFG = os.path.join(CONFIGS, "shapes_seg_teacher_R34.yaml")
STUDENT_CFG = os.path.join(CONFIGS, "shapes_seg_student_R18.yaml")
TOKENS_CFG = os.path.join(CONFIGS, "maskd_shapes_seg_R34-R18_tokens.yaml")
MASKD_CFG = os.path.join(CONFIGS, "maskd_shapes_seg_R34-R18.yaml")
PREFIX = "maskd_shapes_seg"
# the teacher and stage 1 are evaluated on test; the students on val (where choices are made)
# and test (what is reported)
TEST = ["DATASETS.TEST", f'("{PREFIX}_test",)']
VAL_AND_TEST = ["DATASETS.TEST", f'("{PREFIX}_val", "{PREFIX}_test")']
METRICS = ("mIoU", "fwIoU", "pACC")
# Sizes of a run: the data (the detection demo's default scenes and splits) and the iterations
# of each stage (the configs' schedules; the quick run's prove the pipeline only).
DEFAULT = dict(
    n_train=800, n_val=200, n_test=400, teacher_iter=600, tokens_iter=100, student_iter=400
)
QUICK = dict(n_train=16, n_val=8, n_test=8, teacher_iter=10, tokens_iter=5, student_iter=10)
# Every training run imports demo/seg_data.py (--import), which registers the splits named in
# this environment variable (importing it here would register them before they exist).
SEG_DATA = os.path.join(HERE, "seg_data.py")
SEG_DATA_ENV = "MASKD_SHAPES_SEG"


def miou(out_dir: str, dataset: str = "") -> Dict[str, float]:
    """The last semantic-segmentation evaluation of a run ({"mIoU", "fwIoU", "pACC"})."""
    return rep.final_metrics(out_dir, dataset, task="sem_seg", metrics=METRICS)


def run_seg_demo(
    output: str,
    quick: bool = False,
    seeds: int = 6,
    data_root: str = "",
    fresh: bool = False,
    jobs: int = 1,
) -> str:
    """Run the segmentation demo and write ``<output>/report.md``; returns its path.

    Args:
        output: the folder of every run and the report.
        quick: a tiny run that proves the pipeline (the numbers mean nothing).
        seeds: student seeds; the baseline and the MasKD student of a seed share its data
            order and initialisation, so their difference is paired.
        data_root: where the generated data is cached (default ``<root>/datasets/shapes``).
        fresh: delete ``output`` first.
        jobs: training runs at a time (each then on one thread).
    """
    if fresh and os.path.isdir(output):
        shutil.rmtree(output)
    if jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    output = os.path.abspath(output)
    size = QUICK if quick else DEFAULT
    start = time.perf_counter()
    splits = shapes_dataset(
        data_root or os.path.join(ROOT, "datasets", "shapes"),
        size["n_train"],
        size["n_val"],
        num_test=size["n_test"],
    )
    spec = {
        "classes": CLASSES + ["background"],  # the label maps' last label is the background
        "ignore_label": SEM_IGNORE,
        "splits": {
            f"{PREFIX}_{s}": os.path.dirname(json_file) for s, (json_file, _) in splits.items()
        },
    }
    os.environ[SEG_DATA_ENV] = json.dumps(spec)  # read by every training run's --import
    runner = StageRunner(imports=[SEG_DATA])
    pool = ThreadPoolExecutor(max_workers=jobs)

    def in_parallel(tasks: Dict):
        futures = {k: pool.submit(fn) for k, fn in tasks.items()}
        return {k: f.result() for k, f in futures.items()}

    def train(name, config, opts):
        out_dir = os.path.join(output, name)
        args = ["--config-file", config, *opts, "OUTPUT_DIR", out_dir]
        return lambda: runner.run(name, out_dir, args)

    student_schedule = rep.schedule(size["student_iter"])
    first = {"teacher": train("teacher", TEACHER_CFG, rep.schedule(size["teacher_iter"]) + TEST)}
    for s in range(seeds):
        first[s] = train(
            f"student_seed{s}", STUDENT_CFG, student_schedule + ["SEED", str(s)] + VAL_AND_TEST
        )
    done = in_parallel(first)
    teacher_weights = os.path.join(done["teacher"], "model_final.pth")

    def pipeline(folder, stages, student=(), weights=""):
        return lambda: run_pipeline(
            os.path.join(output, folder),
            TOKENS_CFG,
            MASKD_CFG,
            tokens_opts=["SOLVER.MAX_ITER", str(size["tokens_iter"])] + TEST,
            student_opts=list(student),
            tokens_weights=weights,
            stages=stages,
            runner=runner,
            teacher_config=TEACHER_CFG,
            teacher_weights=teacher_weights,
        )

    tokens = pipeline("maskd_seed0", ("tokens",))()["stages"]["tokens"]
    students = in_parallel(
        {
            s: pipeline(
                f"maskd_seed{s}",
                STAGES[1:],
                student_schedule + ["SEED", str(s)] + VAL_AND_TEST,
                weights=tokens["checkpoint"],
            )
            for s in range(seeds)
        }
    )
    pool.shutdown()

    results = {
        "teacher": miou(done["teacher"]),
        "masked teacher retention": rep.retention_of(tokens["dir"], "sem_seg/mIoU"),
        "token statistics": rep.token_statistics_of(tokens["dir"]),
    }
    for split in ("val", "test"):
        dataset = f"{PREFIX}_{split}"
        results[f"baseline {split}"] = {s: miou(done[s], dataset) for s in range(seeds)}
        results[f"maskd {split}"] = {
            s: miou(p["stages"]["student"]["dir"], dataset) for s, p in students.items()
        }
    results["maskd released test"] = {
        s: p["stages"]["evaluate"]["results"][f"{PREFIX}_test"]["sem_seg"]["mIoU"]
        for s, p in students.items()
    }
    total = time.perf_counter() - start
    path = write_report(output, results, size, seeds, total, quick)
    text = json.dumps(rep.json_safe({"results": results, "total_s": total}), indent=1)
    atomic_write(os.path.join(output, "results.json"), lambda tmp: write_text(tmp, text), True)
    logger.info("[seg demo] report: %s", path)
    return path


def paired_miou(results: dict, split: str, seeds) -> Dict[str, float]:
    """MasKD minus baseline mIoU on ``split``, paired by student seed, with its 95% t-interval."""
    a = [results[f"maskd {split}"][s]["mIoU"] for s in seeds]
    b = [results[f"baseline {split}"][s]["mIoU"] for s in seeds]
    return rep.paired(a, b)


def write_report(output, results, size, seeds, total, quick) -> str:
    """``<output>/report.md``: the teacher, stage 1's retention, every student seed and the
    paired MasKD minus baseline mIoU (95% t-interval), on val and test."""
    seed_list = list(range(seeds))
    lines: List[str] = [
        "# MasKD segmentation demo: the paper's recipe on the output logits",
        "",
        f"Mode: {'QUICK (pipeline check only; the numbers mean nothing)' if quick else 'default'}."
        f" Data: the shapes label maps, {size['n_train']} train / {size['n_val']} val /"
        f" {size['n_test']} test images of 128x128, 6 classes (5 shapes, background)."
        f" Semantic FPN R34 teacher ({size['teacher_iter']} iterations), 8 tokens on its"
        f" logits ({size['tokens_iter']} iterations), R18 students ({size['student_iter']}"
        f" iterations) with and without distillation, {seeds} seed(s). Total {total:.0f} s.",
        "",
        f"Teacher mIoU (test): {rep.num(results['teacher']['mIoU'])}; masked teacher retention"
        f" (stage 1): {results['masked teacher retention']:.3f}.",
        "",
        "| seed | baseline val | MasKD val | baseline test | MasKD test | released MasKD test |",
        "|---|---|---|---|---|---|",
    ]
    for s in seed_list:
        cells = [
            rep.num(results[f"{kind} {split}"][s]["mIoU"])
            for split in ("val", "test")
            for kind in ("baseline", "maskd")
        ]
        cells.append(rep.num(results["maskd released test"][s]))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "MasKD minus baseline mIoU, paired by student seed (both trained with the seed's"
        " initialisation and data order), mean with its 95% t-interval:",
        "",
    ]
    for split in ("val", "test"):
        p = paired_miou(results, split, seed_list)
        lines.append(
            f"- {split}: {rep.interval(p)}, per seed {rep.signed_list(p['per seed'])}; a"
            f" difference of this size and spread needs {rep.seeds_to_resolve(p)} seeds"
        )
    lines.append("")
    path = os.path.join(output, "report.md")
    atomic_write(path, lambda tmp: write_text(tmp, "\n".join(lines)), True)
    return path


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=6, help="student seeds")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "seg_demo"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "datasets", "shapes"))
    parser.add_argument("--fresh", action="store_true", help="delete --output first")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    args = parser.parse_args(argv)
    setup_logger(name="maskd")
    print(
        run_seg_demo(
            args.output,
            quick=args.quick,
            seeds=args.seeds,
            data_root=args.data_root,
            fresh=args.fresh,
            jobs=args.jobs,
        )
    )


if __name__ == "__main__":
    main()
