"""MasKD end to end in one command: learn the tokens, distil the student, export, evaluate.

    python distill_net.py --num-gpus 8 \\
        --tokens-config configs/COCO-Detection/<pair>_tokens_coco.yaml \\
        --student-config configs/COCO-Detection/<pair>_2x_coco.yaml \\
        --output output/<pair>

    # your own COCO-format dataset and teacher (yacs configs shown; see docs/training.md)
    python distill_net.py --num-gpus 8 \\
        --register-coco my_train my_train.json my_images/ \\
        --register-coco my_val my_val.json my_images/ \\
        --tokens-config my_tokens.yaml --student-config my_student.yaml \\
        --teacher-config my_teacher.yaml --teacher-weights my_teacher/model_final.pth \\
        --output output/my_distillation DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"

    # overrides of one stage: one quoted string each; --import for modules of your own
    python distill_net.py ... --student-opts "MODEL.MASKD.LOSS_WEIGHT 2.0" \\
        --import my_project.kd_terms -- SEED 1

Stages, each in its own folder under --output (printed as they finish, with pipeline.json):

    tokens/     stage 1: train_net.py on --tokens-config (the teacher frozen); its log states the
                retention (masked teacher / teacher)
    student/    stage 2: train_net.py on --student-config, MODEL.MASKD.TOKENS_WEIGHTS set to
                tokens/model_final.pth (or to --tokens-weights, which skips stage 1)
    export/     the student for plain detectron2 (student.pth, student.yaml) and the tokens
                (tokens.pth), as tools/export.py writes them
    evaluate/   the released student evaluated by train_net.py --eval-only (results.json)

Running the same command again resumes: finished stages are kept (a stage is finished when its
folder holds the marker ``stage.json``, written when the stage's command succeeded), a killed
training stage continues from its last checkpoint (train_net.py --resume). A finished stage whose
command has changed is an error rather than silently reused; --restart STAGE reruns it (and the
stages after it) in place, or use a new --output.

Trailing arguments (and everything after ``--``) are config overrides for both training stages
(yacs ``KEY VALUE`` pairs for .yaml configs, ``key=value`` for LazyConfig .py); --tokens-opts /
--student-opts take one quoted string of overrides for one stage only (repeatable), so they never
absorb the overrides meant for both; the log states which overrides reach which stage.
--num-gpus, --num-machines, --machine-rank, --dist-url and --import are passed to every
train_net.py call (--import to the export too).
"""

import argparse
import logging
import shlex
from contextlib import nullcontext
from typing import List, Sequence

from ..config import is_lazy_config
from ..engine.pipeline import STAGES, StageRunner, run_pipeline
from ..utils.extensions import add_import_argument
from ..utils.files import hold_folder

__all__ = ["get_parser", "main"]

logger = logging.getLogger(__name__)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens-config", default="", help="the stage-1 config")
    parser.add_argument("--student-config", required=True, help="the stage-2 config")
    parser.add_argument("--output", required=True, help="the folder of every stage")
    parser.add_argument("--teacher-config", default="", help="the teacher's config (both stages)")
    parser.add_argument("--teacher-weights", default="", help="the teacher's weights (both)")
    parser.add_argument(
        "--tokens-weights", default="", help="learned tokens to use instead of stage 1"
    )
    for stage, what in (("tokens", "stage 1"), ("student", "stage 2")):
        parser.add_argument(
            f"--{stage}-opts",
            action="append",
            default=[],
            metavar="'OVERRIDES'",
            help=f"overrides of {what} only, one quoted string (repeatable)",
        )
    parser.add_argument(
        "--stages", nargs="*", default=list(STAGES), choices=STAGES, help="stages to run"
    )
    parser.add_argument(
        "--restart", nargs="*", default=[], choices=STAGES, help="rerun these stages (and later)"
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset for every stage (repeatable)",
    )
    add_import_argument(
        parser, "a module of your own, imported by every stage (see train_net.py; repeatable)"
    )
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="", help="as train_net.py's (default: auto)")
    parser.add_argument("--dist-timeout", type=float, default=0, help="as train_net.py's")
    return parser


def check_overrides(opts: Sequence[str], config_file: str, what: str) -> None:
    """Fail, naming ``what``, if overrides cannot be meant for ``config_file``'s config system:
    yacs takes ``KEY VALUE`` pairs, LazyConfig ``key=value`` items."""
    if not opts or not config_file:
        return
    if is_lazy_config(config_file):
        bad = [o for o in opts if "=" not in o]
        if bad:
            raise SystemExit(
                f"distill_net.py: {what}: LazyConfig overrides are key=value, got {bad}"
            )
    elif len(opts) % 2:
        raise SystemExit(
            f"distill_net.py: {what}: yacs overrides are KEY VALUE pairs, got an odd number "
            f"({shlex.join(opts)}). Per-stage overrides take one quoted string, e.g. "
            "--student-opts 'MODEL.MASKD.LOSS_WEIGHT 2.0'; overrides for both stages go at the "
            "end of the command, or after --"
        )


def split_overrides(args, extras: List[str]):
    """(both stages, stage 1 only, stage 2 only) from the parsed arguments."""
    if "--" in extras:
        i = extras.index("--")
        before, after = extras[:i], extras[i + 1 :]
    else:
        before, after = extras, []
    unknown = [a for a in before if a.startswith("--")]
    if unknown:
        raise SystemExit(f"distill_net.py: unknown options {unknown}")
    tokens = [x for text in args.tokens_opts for x in shlex.split(text)]
    student = [x for text in args.student_opts for x in shlex.split(text)]
    return before + after, tokens, student


def main(argv=None) -> dict:
    from detectron2.utils.logger import setup_logger

    args, extras = get_parser().parse_known_args(argv)
    opts, tokens_opts, student_opts = split_overrides(args, extras)
    check_overrides(opts, args.student_config, "the overrides of both stages")
    check_overrides(opts, args.tokens_config, "the overrides of both stages")
    check_overrides(tokens_opts, args.tokens_config, "--tokens-opts")
    check_overrides(student_opts, args.student_config, "--student-opts")
    setup_logger(name="maskd")
    logger.info(
        "[pipeline] overrides of both stages: %s; of stage 1 only: %s; of stage 2 only: %s",
        shlex.join(opts) or "none",
        shlex.join(tokens_opts) or "none",
        shlex.join(student_opts) or "none",
    )
    register = [x for spec in args.register_coco for x in ("--register-coco", *spec)]
    launch = ["--num-gpus", str(args.num_gpus), "--num-machines", str(args.num_machines)]
    launch += ["--machine-rank", str(args.machine_rank)]
    if args.dist_url:
        launch += ["--dist-url", args.dist_url]
    if args.dist_timeout:
        launch += ["--dist-timeout", str(args.dist_timeout)]
    # one pipeline per folder (on a multi-machine run, the first machine's holds it)
    hold = hold_folder(args.output, "--output") if args.machine_rank == 0 else nullcontext()
    with hold:
        return run_pipeline(
            args.output,
            args.tokens_config,
            args.student_config,
            opts=opts,
            tokens_opts=tokens_opts,
            student_opts=student_opts,
            teacher_config=args.teacher_config,
            teacher_weights=args.teacher_weights,
            tokens_weights=args.tokens_weights,
            stages=args.stages,
            restart=args.restart,
            runner=StageRunner(register, launch, imports=args.imports),
        )


if __name__ == "__main__":
    from maskd.cli.distill import main as _main  # the function of the named module

    _main()
