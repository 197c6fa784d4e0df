#!/usr/bin/env python
"""MasKD end to end in one command: learn the tokens, distil the student, export, evaluate.

    python distill_net.py --num-gpus 8 \\
        --tokens-config configs/COCO-Detection/<pair>_tokens_coco.yaml \\
        --student-config configs/COCO-Detection/<pair>_2x_coco.yaml \\
        --output output/<pair>

    # your own COCO-format dataset and teacher (yacs configs shown; see the README)
    python distill_net.py --num-gpus 8 \\
        --register-coco my_train my_train.json my_images/ \\
        --register-coco my_val my_val.json my_images/ \\
        --tokens-config my_tokens.yaml --student-config my_student.yaml \\
        --teacher-config my_teacher.yaml --teacher-weights my_teacher/model_final.pth \\
        --output output/my_distillation DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"

Stages, each in its own folder under --output (printed as they finish, with pipeline.json):

    tokens/     stage 1: train_net.py on --tokens-config (the teacher frozen); its log states the
                retention (masked teacher / teacher)
    student/    stage 2: train_net.py on --student-config, MODEL.MASKD.TOKENS_WEIGHTS set to
                tokens/model_final.pth (or to --tokens-weights, which skips stage 1)
    release/    the student for plain detectron2 (student.pth, student.yaml) and the tokens
                (tokens.pth), as tools/export.py writes them
    evaluate/   the released student evaluated by train_net.py --eval-only (results.json)

Running the same command again resumes: finished stages are kept (a stage is finished when its
folder holds the marker ``stage.json``, written when the stage's command succeeded), a killed
training stage continues from its last checkpoint (train_net.py --resume). A finished stage whose
command has changed is an error rather than silently reused; --restart STAGE reruns it (and the
stages after it) in place, or use a new --output.

Trailing arguments are config overrides for both training stages (yacs ``KEY VALUE`` pairs for
.yaml configs, ``key=value`` for LazyConfig .py); --tokens-opts / --student-opts apply to one
stage only. --num-gpus, --num-machines, --machine-rank and --dist-url are passed to every
train_net.py call.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_NET = os.path.join(ROOT, "train_net.py")
STAGES = ("tokens", "student", "export", "evaluate")
MARKER = "stage.json"

logger = logging.getLogger("maskd.distill_net")

# The config keys the pipeline sets, in each config system.
_KEYS = {
    "output_dir": ("OUTPUT_DIR", "train.output_dir"),
    "teacher_config": ("MODEL.MASKD.TEACHER.CONFIG_FILE", "model.teacher.config_file"),
    "teacher_weights": ("MODEL.MASKD.TEACHER.WEIGHTS", "model.teacher.weights"),
    "tokens_weights": ("MODEL.MASKD.TOKENS_WEIGHTS", "model.tokens.weights"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint"),
}


def is_lazy(config_file: str) -> bool:
    """Whether a config file is a LazyConfig (.py, or a .yaml LazyConfig.save wrote) rather
    than a yacs .yaml."""
    from maskd.config import is_lazy_config

    return is_lazy_config(config_file)


def override(config_file: str, what: str, value: str) -> List[str]:
    """The command-line override that sets ``what`` (a key of ``_KEYS``) in ``config_file``'s
    config system: ``["KEY", value]`` for yacs, ``["key=value"]`` for LazyConfig."""
    yacs_key, lazy_key = _KEYS[what]
    return [f"{lazy_key}={value}"] if is_lazy(config_file) else [yacs_key, value]


class StageRunner:
    """Runs one ``train_net.py`` command per stage folder, resumably.

    Args:
        register: ``--register-coco`` arguments for every call.
        launch: launch arguments for every call (``--num-gpus 8`` ...).
        python: the interpreter.
    """

    def __init__(self, register: Sequence[str] = (), launch: Sequence[str] = (), python=None):
        self.register, self.launch = list(register), list(launch)
        self.python = python or sys.executable
        self.times: Dict[str, float] = {}

    @staticmethod
    def finished(out_dir: str) -> Optional[dict]:
        """The marker of a finished stage in ``out_dir``, or None."""
        path = os.path.join(out_dir, MARKER)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def run(self, name: str, out_dir: str, args: List[str], resumable: bool = True) -> str:
        """Run ``train_net.py args`` for the stage ``name`` in ``out_dir`` unless it finished.

        ``args`` are train_net.py's ``--config-file`` (and ``--eval-only``) followed by config
        overrides; they must not depend on ``out_dir``'s contents: they are compared with the marker's
        to detect a changed command. Returns ``out_dir``.

        Raises:
            ValueError: the stage finished with other arguments.
            subprocess.CalledProcessError: the command failed (nothing is marked finished).
        """
        done = self.finished(out_dir)
        if done is not None:
            if done["args"] != args:
                raise ValueError(
                    f"stage '{name}' in {out_dir} finished with other arguments:\n  before: "
                    f"{shlex.join(done['args'])}\n  now:    {shlex.join(args)}\nuse another "
                    f"--output, or --restart {name} to rerun it in place"
                )
            changed = [
                path
                for path, digest in done.get("inputs", {}).items()
                if config_digests([path]).get(path) != digest
            ]
            if changed:
                raise ValueError(
                    f"stage '{name}' in {out_dir} finished, but the contents of "
                    f"{', '.join(changed)} changed since: use another --output, or --restart "
                    f"{name} to rerun it in place"
                )
            logger.info("[pipeline] %s: finished before, kept (%s)", name, out_dir)
            return out_dir
        resume = resumable and os.path.isfile(os.path.join(out_dir, "last_checkpoint"))
        # train_net.py's flags first: its config overrides take the rest of the command line
        cmd = [self.python, TRAIN_NET, *self.register, *self.launch]
        if resume:
            cmd.append("--resume")
            logger.info("[pipeline] %s: resuming the killed run in %s", name, out_dir)
        cmd += args
        logger.info("[pipeline] %s: %s", name, shlex.join(cmd))
        os.makedirs(out_dir, exist_ok=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        self.times[name] = time.perf_counter() - start
        mark(out_dir, name, args, self.times[name])
        return out_dir


def config_digests(args: Sequence[str]) -> Dict[str, Optional[str]]:
    """SHA-256 of every config file an argument names (.yaml, .yml, .py; a yacs file's local
    ``_BASE_`` files too), by path; None for a file that no longer exists."""
    out: Dict[str, Optional[str]] = {}
    todo = [a for a in args if a.endswith((".yaml", ".yml", ".py")) and os.path.isfile(a)]
    while todo:
        path = todo.pop()
        if path in out:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            out[path] = None
            continue
        out[path] = hashlib.sha256(data).hexdigest()
        base = re.search(rb"^_BASE_:\s*[\"']?([^\"'\n]+?)[\"']?\s*$", data, re.M)
        if base and path.endswith((".yaml", ".yml")):
            name = base.group(1).decode(errors="replace")
            local = os.path.join(os.path.dirname(path), name)
            if not name.startswith("zoo:") and os.path.isfile(local):
                todo.append(os.path.normpath(local))
    return out


def mark(out_dir: str, name: str, args: List[str], seconds: float) -> None:
    """Write the marker of a finished stage (atomically: a killed pipeline leaves none), with
    the digests of the config files its arguments name."""
    tmp = os.path.join(out_dir, f".{MARKER}.tmp")
    record = {"stage": name, "args": args, "inputs": config_digests(args)}
    with open(tmp, "w") as f:
        json.dump(dict(record, seconds=round(seconds, 1)), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MARKER))


def unmark(out_dir: str) -> None:
    """Forget that the stage in ``out_dir`` finished (its files stay, for a resume)."""
    path = os.path.join(out_dir, MARKER)
    if os.path.isfile(path):
        os.remove(path)


# Prefixes of evaluation results in metrics.json (detectron2's evaluators; stage 1 adds the
# plain teacher's and the retention).
_RESULT_PREFIXES = ("bbox/", "segm/", "sem_seg/", "panoptic_seg/", "keypoints/", "teacher/")


def last_metrics(out_dir: str) -> dict:
    """The evaluation results of the last record of a training run's ``metrics.json`` that has
    any (``{"bbox/AP": ..., "retention/bbox/AP": ...}``; empty if none)."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in reversed(records):
        found = {
            k: v for k, v in record.items() if k.startswith(_RESULT_PREFIXES + ("retention/",))
        }
        if found:
            return found
    return {}


def run_pipeline(
    output: str,
    tokens_config: str,
    student_config: str,
    *,
    opts: Sequence[str] = (),
    tokens_opts: Sequence[str] = (),
    student_opts: Sequence[str] = (),
    teacher_config: str = "",
    teacher_weights: str = "",
    tokens_weights: str = "",
    stages: Sequence[str] = STAGES,
    restart: Sequence[str] = (),
    runner: Optional[StageRunner] = None,
) -> dict:
    """Run the MasKD pipeline (see the module docstring) and write ``<output>/pipeline.json``.

    Args:
        output: the folder of every stage.
        tokens_config, student_config: the stage-1 and stage-2 configs.
        opts: overrides of both training stages; tokens_opts / student_opts: of one.
        teacher_config, teacher_weights: set the teacher of both stages (else the configs').
        tokens_weights: learned tokens to use instead of running stage 1.
        stages: the stages to run, a subset of :data:`STAGES` in that order (a later stage
            needs the earlier ones' results, from this or a previous call).
        restart: stages to rerun even if finished; the stages after them rerun too.
        runner: the :class:`StageRunner` (launch and dataset arguments).

    Returns:
        the summary written to ``pipeline.json``: for each stage its folder, artifacts and
        seconds; stage 1's retention and the evaluated student's results where available.
    """
    unknown = [s for s in list(stages) + list(restart) if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    for path, what in ((tokens_config, "--tokens-config"), (student_config, "--student-config")):
        if (path or what == "--student-config") and not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: config file not found: '{path}'")
    if tokens_weights and not os.path.isfile(tokens_weights):
        raise FileNotFoundError(f"--tokens-weights: file not found: '{tokens_weights}'")
    if not tokens_weights and not tokens_config:
        raise ValueError("give --tokens-config (stage 1) or --tokens-weights (learned tokens)")
    # Files as absolute paths: the stages' own config dumps name them unambiguously.
    tokens_config = os.path.abspath(tokens_config) if tokens_config else ""
    student_config = os.path.abspath(student_config)
    if teacher_config and os.path.isfile(teacher_config):  # else a model-zoo name
        teacher_config = os.path.abspath(teacher_config)
    teacher_weights = (
        os.path.abspath(teacher_weights) if os.path.isfile(teacher_weights) else teacher_weights
    )
    runner = runner or StageRunner()
    dirs = {s: os.path.abspath(os.path.join(output, s)) for s in STAGES}
    first_restart = min((STAGES.index(s) for s in restart), default=len(STAGES))
    restarted = set(STAGES[first_restart:])  # rerun from scratch, not resumed
    for stage in restarted:
        unmark(dirs[stage])
    summary: dict = {"output": os.path.abspath(output), "stages": {}}

    def teacher(config_file):
        out = []
        if teacher_config:
            out += override(config_file, "teacher_config", teacher_config)
        if teacher_weights:
            out += override(config_file, "teacher_weights", teacher_weights)
        return out

    # Stage 1: the tokens.
    if tokens_weights:
        tokens_file = os.path.abspath(tokens_weights)
        summary["stages"]["tokens"] = {"given": tokens_file}
    else:
        tokens_file = os.path.join(dirs["tokens"], "model_final.pth")
        if "tokens" in stages:
            args = ["--config-file", tokens_config, *teacher(tokens_config), *opts, *tokens_opts]
            args += override(tokens_config, "output_dir", dirs["tokens"])
            runner.run("tokens", dirs["tokens"], args, resumable="tokens" not in restarted)
        if StageRunner.finished(dirs["tokens"]):
            evals = last_metrics(dirs["tokens"])
            summary["stages"]["tokens"] = {
                "dir": dirs["tokens"],
                "checkpoint": tokens_file,
                "retention": {k[10:]: v for k, v in evals.items() if k.startswith("retention/")},
            }

    # Stage 2: the student.
    student_file = os.path.join(dirs["student"], "model_final.pth")
    student_args = ["--config-file", student_config, *teacher(student_config)]
    student_args += [*opts, *student_opts]
    if "student" in stages:
        if not os.path.isfile(tokens_file):
            raise FileNotFoundError(
                f"stage 2 needs the tokens of stage 1 ('{tokens_file}'): run the tokens stage "
                "first, or give --tokens-weights"
            )
        args = student_args + override(student_config, "tokens_weights", tokens_file)
        args += override(student_config, "output_dir", dirs["student"])
        runner.run("student", dirs["student"], args, resumable="student" not in restarted)
    if StageRunner.finished(dirs["student"]):
        summary["stages"]["student"] = {
            "dir": dirs["student"],
            "checkpoint": student_file,
            "results": last_metrics(dirs["student"]),
        }

    # Export: the student for plain detectron2, and the tokens.
    release = {
        "student": os.path.join(dirs["export"], "student.pth"),
        "student_config": os.path.join(dirs["export"], "student.yaml"),
        "tokens": os.path.join(dirs["export"], "tokens.pth"),
    }
    if "export" in stages and StageRunner.finished(dirs["export"]):
        logger.info("[pipeline] export: finished before, kept (%s)", dirs["export"])
    elif "export" in stages:
        if not StageRunner.finished(dirs["student"]):
            raise FileNotFoundError(f"the export needs a finished stage 2 in {dirs['student']}")
        export(student_config, student_args, student_file, tokens_file, release, runner)
    if StageRunner.finished(dirs["export"]):
        summary["stages"]["export"] = {"dir": dirs["export"], **release}

    # Evaluate the released student with plain detectron2 (train_net.py --eval-only).
    if "evaluate" in stages:
        if not StageRunner.finished(dirs["export"]):
            raise FileNotFoundError(f"the evaluation needs the export in {dirs['export']}")
        config = release["student_config"]
        args = [
            "--eval-only",
            "--config-file",
            config,
            *override(config, "weights", release["student"]),
        ]
        args += override(config, "output_dir", dirs["evaluate"])
        runner.run("evaluate", dirs["evaluate"], args, resumable=False)
    if StageRunner.finished(dirs["evaluate"]):
        with open(os.path.join(dirs["evaluate"], "results.json")) as f:
            summary["stages"]["evaluate"] = {"dir": dirs["evaluate"], "results": json.load(f)}

    for stage, info in summary["stages"].items():
        done = StageRunner.finished(dirs[stage]) if "dir" in info else None
        if done is not None:
            info["seconds"] = done["seconds"]
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "pipeline.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    for stage, info in summary["stages"].items():
        where = info.get("checkpoint") or info.get("student") or info.get("dir") or info["given"]
        logger.info("[pipeline] %s: %s", stage, where)
    logger.info("[pipeline] summary: %s", path)
    return summary


def export(config_file, args, student_file, tokens_file, release, runner: StageRunner) -> None:
    """The export stage: tools/export.py for the student (with its config) and the tokens."""
    out_dir = os.path.dirname(release["student"])
    os.makedirs(out_dir, exist_ok=True)
    tool = os.path.join(ROOT, "tools", "export.py")
    start = time.perf_counter()
    # The stage-2 overrides (args minus --config-file) make the student's config.
    overrides = [a for a in args if a not in ("--config-file", config_file)]
    commands = [
        [tool, "student", "--config-file", config_file, "--checkpoint", student_file]
        + ["--output", release["student"], "--force", *overrides],
        [tool, "tokens", "--checkpoint", tokens_file, "--output", release["tokens"], "--force"],
    ]
    for cmd in commands:
        logger.info("[pipeline] export: %s", shlex.join(cmd))
        subprocess.run([runner.python, *cmd], check=True)
    runner.times["export"] = time.perf_counter() - start
    mark(out_dir, "export", [], runner.times["export"])


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
    parser.add_argument("--tokens-opts", nargs="*", default=[], help="overrides of stage 1 only")
    parser.add_argument("--student-opts", nargs="*", default=[], help="overrides of stage 2 only")
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
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="", help="as train_net.py's (default: auto)")
    parser.add_argument("--dist-timeout", type=float, default=0, help="as train_net.py's")
    return parser


def main(argv=None) -> dict:
    from detectron2.utils.logger import setup_logger

    args, opts = get_parser().parse_known_args(argv)
    if any(a.startswith("--") for a in opts):
        raise SystemExit(f"distill_net.py: unknown options {[a for a in opts if a[:2] == '--']}")
    setup_logger(name="maskd")
    register = [x for spec in args.register_coco for x in ("--register-coco", *spec)]
    launch = ["--num-gpus", str(args.num_gpus), "--num-machines", str(args.num_machines)]
    launch += ["--machine-rank", str(args.machine_rank)]
    if args.dist_url:
        launch += ["--dist-url", args.dist_url]
    if args.dist_timeout:
        launch += ["--dist-timeout", str(args.dist_timeout)]
    return run_pipeline(
        args.output,
        args.tokens_config,
        args.student_config,
        opts=opts,
        tokens_opts=args.tokens_opts,
        student_opts=args.student_opts,
        teacher_config=args.teacher_config,
        teacher_weights=args.teacher_weights,
        tokens_weights=args.tokens_weights,
        stages=args.stages,
        restart=args.restart,
        runner=StageRunner(register, launch),
    )


if __name__ == "__main__":
    main()
