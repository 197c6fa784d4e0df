#!/usr/bin/env python
"""MasKD end to end on CPU: train a teacher, learn its receptive tokens, train a student with
and without MasKD, evaluate all with COCO AP, and write output/demo/report.md.

    python tools/demo.py            # the default run
    python tools/demo.py --quick    # a tiny run that checks the pipeline (numbers mean nothing)
    python tools/demo.py --seeds 3  # the students with 3 seeds
    python tools/demo.py --teacher-seeds 2 --seeds 3 --token-seeds 3
                                    # the perturbation benchmark: 2 teachers x 3 student seeds,
                                    # 3 stage-1 seeds per teacher (retention)
"""

import argparse
import os

from detectron2.utils.logger import setup_logger

from maskd.demo import run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=1, help="student seeds")
    parser.add_argument(
        "--teacher-seeds", type=int, default=1, help="teachers (each with tokens and students)"
    )
    parser.add_argument("--token-seeds", type=int, default=1, help="stage-1 runs per teacher")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "datasets", "shapes"))
    parser.add_argument("--reuse", action="store_true", help="keep finished stages in --output")
    parser.add_argument(
        "--maskd-opts", nargs="*", default=[], help="overrides of the MasKD students"
    )
    args = parser.parse_args()
    setup_logger(name="maskd")
    report = run_demo(
        ROOT,
        args.output,
        quick=args.quick,
        seeds=args.seeds,
        data_root=args.data_root,
        reuse=args.reuse,
        maskd_opts=args.maskd_opts,
        teacher_seeds=args.teacher_seeds,
        token_seeds=args.token_seeds,
    )
    with open(report) as f:
        print(f.read())


if __name__ == "__main__":
    main()
