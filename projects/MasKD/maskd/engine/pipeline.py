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

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..config import is_lazy_config, local_config_files
from ..utils.files import atomic_write, open_regular, read_small_text, write_text

__all__ = [
    "run_pipeline",
    "StageRunner",
    "STAGES",
    "TRAIN_MODULE",
    "EXPORT_MODULE",
    "override",
    "input_digests",
    "mark",
    "unmark",
    "last_metrics",
]

logger = logging.getLogger(__name__)

# The commands of the stages: train_net.py and tools/export.py, as modules of the package.
TRAIN_MODULE, EXPORT_MODULE = "maskd.cli.train", "maskd.cli.export"
STAGES = ("tokens", "student", "export", "evaluate")
MARKER = "stage.json"
# The command a training stage was started with: a killed stage resumes only under the same one.
STARTED = "started.json"


# The config keys the pipeline sets, in each config system.
_KEYS = {
    "output_dir": ("OUTPUT_DIR", "train.output_dir"),
    "teacher_config": ("MODEL.MASKD.TEACHER.CONFIG_FILE", "model.teacher.config_file"),
    "teacher_weights": ("MODEL.MASKD.TEACHER.WEIGHTS", "model.teacher.weights"),
    "tokens_weights": ("MODEL.MASKD.TOKENS_WEIGHTS", "model.tokens.weights"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint"),
}


def override(config_file: str, what: str, value: str) -> List[str]:
    """The command-line override that sets ``what`` (a key of ``_KEYS``) in ``config_file``'s
    config system: ``["KEY", value]`` for yacs, ``["key=value"]`` for LazyConfig."""
    yacs_key, lazy_key = _KEYS[what]
    return [f"{lazy_key}={value}"] if is_lazy_config(config_file) else [yacs_key, value]


class StageRunner:
    """Runs one ``train_net.py`` command per stage folder, resumably.

    Args:
        register: ``--register-coco`` arguments for every call.
        launch: launch arguments for every call (``--num-gpus 8`` ...).
        python: the interpreter.
        imports: modules of the user's to import in every stage (``--import``).
    """

    def __init__(
        self,
        register: Sequence[str] = (),
        launch: Sequence[str] = (),
        python=None,
        imports: Sequence[str] = (),
    ):
        self.register, self.launch = list(register), list(launch)
        self.python = python or sys.executable
        self.imports = [x for name in imports for x in ("--import", name)]
        self.times: Dict[str, float] = {}

    @staticmethod
    def finished(out_dir: str) -> Optional[dict]:
        """The marker of a finished stage in ``out_dir``, or None.

        Raises:
            ValueError: naming the file, if the marker is not one (empty, cut short, edited).
        """
        return _read_record(os.path.join(out_dir, MARKER), "the marker of a finished stage")

    def record(self, args: List[str]) -> dict:
        """What identifies a stage's command: its arguments, the datasets every stage
        registers, and the digests of the config and annotation files they name."""
        return {
            "args": list(args),
            "datasets": self.register,
            "inputs": input_digests(list(args) + self.register),
        }

    def run(self, name: str, out_dir: str, args: List[str], resumable: bool = True) -> str:
        """Run ``train_net.py args`` for the stage ``name`` in ``out_dir`` unless it finished.

        ``args`` are train_net.py's ``--config-file`` (and ``--eval-only``) followed by config
        overrides; they must not depend on ``out_dir``'s contents: with the registered datasets
        and the contents of the files they name, they are compared with the marker's to detect
        a changed command, and with the record of the command a killed stage was started with
        before it is resumed. Returns ``out_dir``.

        Raises:
            ValueError: the stage finished, or was started, with another command or data.
            subprocess.CalledProcessError: the command failed (nothing is marked finished).
        """
        record = self.record(args)
        done = self.finished(out_dir)
        if done is not None:
            _check_same_command(name, out_dir, done, record, "finished")
            logger.info("[pipeline] %s: finished before, kept (%s)", name, out_dir)
            return out_dir
        resume = resumable and os.path.lexists(os.path.join(out_dir, "last_checkpoint"))
        started = os.path.join(out_dir, STARTED)
        if resume and os.path.lexists(started):
            before = _read_record(started, "the record of a started stage")
            _check_same_command(name, out_dir, before, record, "was started")
        # train_net.py's flags first: its config overrides take the rest of the command line
        cmd = [self.python, "-m", TRAIN_MODULE, *self.imports, *self.register, *self.launch]
        if resume:
            cmd.append("--resume")
            logger.info("[pipeline] %s: resuming the killed run in %s", name, out_dir)
        cmd += args
        logger.info("[pipeline] %s: %s", name, shlex.join(cmd))
        os.makedirs(out_dir, exist_ok=True)
        if not resume:
            _write_record(started, dict(record, stage=name))
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        self.times[name] = time.perf_counter() - start
        mark(out_dir, name, args, self.times[name], record)
        return out_dir


def _read_record(path: str, what: str) -> Optional[dict]:
    if not os.path.lexists(path):
        return None
    try:  # a marker is small; a link, a directory or a FIFO is refused, named
        record = json.loads(read_small_text(path, 1 << 24, what))
    except json.JSONDecodeError as e:
        record = e
    if not isinstance(record, dict) or not isinstance(record.get("args"), list):
        raise ValueError(
            f"'{path}' is not {what} (an object with the stage's \"args\"): it is empty, cut "
            "short or edited. Remove it to run the stage again (--restart STAGE does), or use "
            "another --output"
        )
    return record


def _write_record(path: str, record: dict) -> None:
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(record, indent=1)), overwrite=True)


def _check_same_command(name: str, out_dir: str, before: dict, now: dict, how: str) -> None:
    """Fail if the stage ``name`` ``how`` ("finished", "was started") with another command."""
    hint = f"use another --output, or --restart {name} to rerun it in place"
    if before["args"] != now["args"]:
        raise ValueError(
            f"stage '{name}' in {out_dir} {how} with other arguments:\n  before: "
            f"{shlex.join(before['args'])}\n  now:    {shlex.join(now['args'])}\n{hint}"
        )
    if "datasets" in before and before["datasets"] != now["datasets"]:
        raise ValueError(
            f"stage '{name}' in {out_dir} {how} with other datasets (--register-coco):\n  "
            f"before: {shlex.join(before['datasets']) or 'none'}\n  now:    "
            f"{shlex.join(now['datasets']) or 'none'}\n{hint}"
        )
    changed = [
        path
        for path, digest in before.get("inputs", {}).items()
        if now["inputs"].get(path, input_digests([path]).get(path)) != digest
    ]
    if changed:
        raise ValueError(
            f"stage '{name}' in {out_dir} {how}, but the contents of {', '.join(changed)} "
            f"changed since: {hint}"
        )


# What a stage reads besides its command: configs and annotations, and weights (a teacher's,
# the tokens', a checkpoint to export), by the suffixes of their files.
_CONFIG_SUFFIXES = (".yaml", ".yml", ".py", ".json")
_WEIGHTS_SUFFIXES = (".pth", ".pkl", ".pyth", ".safetensors")


def input_digests(args: Sequence[str]) -> Dict[str, Optional[str]]:
    """SHA-256 of every config, annotation or weights file an argument names (.yaml, .yml,
    .py, .json, .pth, .pkl, .pyth, .safetensors; a yacs file's local ``_BASE_`` files too), by
    path; None for a file that no longer exists. A file replaced at the same path changes it."""
    out: Dict[str, Optional[str]] = {}
    for arg in args:
        if not (arg.endswith(_CONFIG_SUFFIXES + _WEIGHTS_SUFFIXES) and os.path.isfile(arg)):
            continue
        if arg.endswith(_WEIGHTS_SUFFIXES):
            out.setdefault(arg, _digest(arg))
            continue
        # the file by the name given, its _BASE_ files as paths of the same kind
        bases = local_config_files(arg)[1:]
        keys = [arg] + [b if os.path.isabs(arg) else os.path.relpath(b) for b in bases]
        for key in keys:
            if key not in out:
                out[key] = _digest(key)
    return out


def _digest(path: str) -> Optional[str]:
    """SHA-256 of a file's bytes, read in blocks; None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def mark(
    out_dir: str, name: str, args: List[str], seconds: float, record: Optional[dict] = None
) -> None:
    """Write the marker of a finished stage (atomically: a killed pipeline leaves none): its
    arguments and the digests of the files they name, or ``record``
    (:meth:`StageRunner.record`)."""
    record = record or {"args": list(args), "inputs": input_digests(args)}
    _write_record(
        os.path.join(out_dir, MARKER), dict(record, stage=name, seconds=round(seconds, 1))
    )


def unmark(out_dir: str) -> None:
    """Forget that the stage in ``out_dir`` finished or was started (its files stay)."""
    for name in (MARKER, STARTED):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


# Prefixes of evaluation results in metrics.json (detectron2's evaluators; stage 1 adds the
# plain teacher's and the retention).
_RESULT_PREFIXES = ("bbox/", "segm/", "sem_seg/", "panoptic_seg/", "keypoints/", "teacher/")


def last_metrics(out_dir: str) -> dict:
    """The evaluation results of the last record of a training run's ``metrics.json`` that has
    any (``{"bbox/AP": ..., "retention/bbox/AP": ...}``; empty if none)."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.lexists(path):
        return {}
    with os.fdopen(open_regular(path, os.O_RDONLY, "metrics.json"), "rb") as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"'{path}' is not a JSON-lines text file ({e})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == lines[-1][0]:  # a run killed while writing its last record
                logger.warning("%s: line %d is cut short; it is skipped", path, number)
                continue
            raise ValueError(f"'{path}', line {number}, is not a JSON record: {e}") from None
    for record in reversed(records):
        if not isinstance(record, dict):
            continue
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
