"""The MasKD pipeline behind ``distill_net.py``: stage 1 (tokens), stage 2 (student), export
and evaluation, each a ``train_net.py`` (or export) command in its own folder, resumable.

Stages, each in its own folder under the output (with ``pipeline.json``):

    tokens/     stage 1 (the teacher frozen); its log states the retention
    student/    stage 2, MODEL.MASKD.TOKENS_WEIGHTS set to tokens/model_final.pth
    export/     the student for plain detectron2 (student.pth, student.yaml) and the tokens
    evaluate/   the released student evaluated by train_net.py --eval-only (results.json)

A stage is finished when its folder holds the marker ``stage.json``, written when its command
succeeded; running again keeps finished stages, resumes a killed training stage from its last
checkpoint, and refuses a finished stage whose command or config files changed.
"""

import json
import logging
import os
import shlex
import subprocess
import time
from typing import List, Optional, Sequence

from .files import atomic_write, write_text
from .stages import (
    EXPORT_MODULE,
    STAGES,
    StageRunner,
    last_metrics,
    mark,
    override,
    unmark,
)

__all__ = ["run_pipeline", "StageRunner", "STAGES"]

logger = logging.getLogger(__name__)


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
    _check_arguments(tokens_config, student_config, tokens_weights, stages, restart)
    pipe = _Pipeline(output, runner or StageRunner(), restart)
    pipe.teacher_files(teacher_config, teacher_weights)
    tokens_config = os.path.abspath(tokens_config) if tokens_config else ""
    student_config = os.path.abspath(student_config)
    tokens_file = pipe.tokens(tokens_config, [*opts, *tokens_opts], tokens_weights, stages)
    student_args = ["--config-file", student_config, *pipe.teacher(student_config)]
    student_args += [*opts, *student_opts]
    pipe.student(student_config, student_args, tokens_file, stages)
    pipe.export(student_config, student_args, tokens_file, stages)
    pipe.evaluate(stages)
    return pipe.write_summary()


def _check_arguments(tokens_config, student_config, tokens_weights, stages, restart) -> None:
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


class _Pipeline:
    """The stages of one :func:`run_pipeline` call, in their folders under ``output``."""

    def __init__(self, output: str, runner: StageRunner, restart: Sequence[str]):
        self.output, self.runner = output, runner
        self.dirs = {s: os.path.abspath(os.path.join(output, s)) for s in STAGES}
        first_restart = min((STAGES.index(s) for s in restart), default=len(STAGES))
        self.restarted = set(STAGES[first_restart:])  # rerun from scratch, not resumed
        for stage in self.restarted:
            unmark(self.dirs[stage])
        self.summary: dict = {"output": os.path.abspath(output), "stages": {}}
        self.release = {
            "student": os.path.join(self.dirs["export"], "student.pth"),
            "student_config": os.path.join(self.dirs["export"], "student.yaml"),
            "tokens": os.path.join(self.dirs["export"], "tokens.pth"),
        }

    def teacher_files(self, config: str, weights: str) -> None:
        # files as absolute paths: the stages' own config dumps name them unambiguously
        if config and os.path.isfile(config):  # else a model-zoo name
            config = os.path.abspath(config)
        self.teacher_config = config
        self.teacher_weights = os.path.abspath(weights) if os.path.isfile(weights) else weights

    def teacher(self, config_file: str) -> List[str]:
        """The overrides that set the teacher given on the command line, if any."""
        out = []
        if self.teacher_config:
            out += override(config_file, "teacher_config", self.teacher_config)
        if self.teacher_weights:
            out += override(config_file, "teacher_weights", self.teacher_weights)
        return out

    def finished(self, stage: str) -> Optional[dict]:
        return StageRunner.finished(self.dirs[stage])

    def tokens(self, config: str, opts: List[str], given: str, stages) -> str:
        """Stage 1 (unless tokens are given); returns the tokens file for stage 2."""
        if given:
            self.summary["stages"]["tokens"] = {"given": os.path.abspath(given)}
            return os.path.abspath(given)
        out = self.dirs["tokens"]
        if "tokens" in stages:
            args = ["--config-file", config, *self.teacher(config), *opts]
            args += override(config, "output_dir", out)
            self.runner.run("tokens", out, args, resumable="tokens" not in self.restarted)
        tokens_file = os.path.join(out, "model_final.pth")
        if self.finished("tokens"):
            evals = last_metrics(out)
            self.summary["stages"]["tokens"] = {
                "dir": out,
                "checkpoint": tokens_file,
                "retention": {k[10:]: v for k, v in evals.items() if k.startswith("retention/")},
            }
        return tokens_file

    def student(self, config: str, args: List[str], tokens_file: str, stages) -> None:
        out = self.dirs["student"]
        if "student" in stages:
            if not os.path.isfile(tokens_file):
                raise FileNotFoundError(
                    f"stage 2 needs the tokens of stage 1 ('{tokens_file}'): run the tokens "
                    "stage first, or give --tokens-weights"
                )
            args = args + override(config, "tokens_weights", tokens_file)
            args += override(config, "output_dir", out)
            self.runner.run("student", out, args, resumable="student" not in self.restarted)
        if self.finished("student"):
            self.summary["stages"]["student"] = {
                "dir": out,
                "checkpoint": os.path.join(out, "model_final.pth"),
                "results": last_metrics(out),
            }

    def export(self, config: str, args: List[str], tokens_file: str, stages) -> None:
        """The student for plain detectron2 (with its config), and the tokens."""
        out = self.dirs["export"]
        if "export" in stages and self.finished("export"):
            logger.info("[pipeline] export: finished before, kept (%s)", out)
        elif "export" in stages:
            if not self.finished("student"):
                raise FileNotFoundError(
                    f"the export needs a finished stage 2 in {self.dirs['student']}"
                )
            student_file = os.path.join(self.dirs["student"], "model_final.pth")
            export(config, args, student_file, tokens_file, self.release, self.runner)
        if self.finished("export"):
            self.summary["stages"]["export"] = {"dir": out, **self.release}

    def evaluate(self, stages) -> None:
        """The released student, evaluated by plain detectron2 (train_net.py --eval-only)."""
        out = self.dirs["evaluate"]
        if "evaluate" in stages:
            if not self.finished("export"):
                raise FileNotFoundError(f"the evaluation needs the export in {self.dirs['export']}")
            config = self.release["student_config"]
            args = ["--eval-only", "--config-file", config]
            args += override(config, "weights", self.release["student"])
            args += override(config, "output_dir", out)
            self.runner.run("evaluate", out, args, resumable=False)
        if self.finished("evaluate"):
            with open(os.path.join(out, "results.json")) as f:
                self.summary["stages"]["evaluate"] = {"dir": out, "results": json.load(f)}

    def write_summary(self) -> dict:
        for stage, info in self.summary["stages"].items():
            done = self.finished(stage) if "dir" in info else None
            if done is not None:
                info["seconds"] = done["seconds"]
        os.makedirs(self.output, exist_ok=True)
        path = os.path.join(self.output, "pipeline.json")
        text = json.dumps(self.summary, indent=1)
        atomic_write(path, lambda tmp: write_text(tmp, text), overwrite=True)
        for stage, info in self.summary["stages"].items():
            where = info.get("checkpoint") or info.get("student") or info.get("dir")
            logger.info("[pipeline] %s: %s", stage, where or info["given"])
        logger.info("[pipeline] summary: %s", path)
        return self.summary


def export(config_file, args, student_file, tokens_file, release, runner: StageRunner) -> None:
    """The export stage: tools/export.py for the student (with its config) and the tokens."""
    out_dir = os.path.dirname(release["student"])
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    # The stage-2 overrides (args minus --config-file) make the student's config.
    overrides = [a for a in args if a not in ("--config-file", config_file)]
    commands = [
        ["-m", EXPORT_MODULE, "student", *runner.imports, "--config-file", config_file]
        + ["--checkpoint", student_file, "--output", release["student"], "--force", *overrides],
        ["-m", EXPORT_MODULE, "tokens", "--checkpoint", tokens_file]
        + ["--output", release["tokens"], "--force"],
    ]
    for cmd in commands:
        logger.info("[pipeline] export: %s", shlex.join(cmd))
        subprocess.run([runner.python, *cmd], check=True)
    runner.times["export"] = time.perf_counter() - start
    mark(out_dir, "export", [], runner.times["export"])
