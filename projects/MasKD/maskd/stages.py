"""The stages of the MasKD pipeline (:mod:`maskd.pipeline`): running one command per stage
folder resumably, the marker of a finished stage, and what the stages read back."""

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

from .config import is_lazy_config
from .files import atomic_write, write_text

__all__ = [
    "STAGES",
    "TRAIN_MODULE",
    "EXPORT_MODULE",
    "StageRunner",
    "override",
    "config_digests",
    "mark",
    "unmark",
    "last_metrics",
]

# The commands of the stages: train_net.py and tools/export.py, as modules of the package.
TRAIN_MODULE, EXPORT_MODULE = "maskd.cli.train", "maskd.cli.export"
STAGES = ("tokens", "student", "export", "evaluate")
MARKER = "stage.json"
# The command a training stage was started with: a killed stage resumes only under the same one.
STARTED = "started.json"

logger = logging.getLogger(__name__)

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
            "inputs": config_digests(list(args) + self.register),
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
        resume = resumable and os.path.isfile(os.path.join(out_dir, "last_checkpoint"))
        started = os.path.join(out_dir, STARTED)
        if resume and os.path.isfile(started):
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
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        if now["inputs"].get(path, config_digests([path]).get(path)) != digest
    ]
    if changed:
        raise ValueError(
            f"stage '{name}' in {out_dir} {how}, but the contents of {', '.join(changed)} "
            f"changed since: {hint}"
        )


def config_digests(args: Sequence[str]) -> Dict[str, Optional[str]]:
    """SHA-256 of every config or annotation file an argument names (.yaml, .yml, .py, .json; a
    yacs file's local ``_BASE_`` files too), by path; None for a file that no longer exists."""
    out: Dict[str, Optional[str]] = {}
    suffixes = (".yaml", ".yml", ".py", ".json")
    todo = [a for a in args if a.endswith(suffixes) and os.path.isfile(a)]
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


def mark(
    out_dir: str, name: str, args: List[str], seconds: float, record: Optional[dict] = None
) -> None:
    """Write the marker of a finished stage (atomically: a killed pipeline leaves none): its
    arguments and the digests of the files they name, or ``record``
    (:meth:`StageRunner.record`)."""
    record = record or {"args": list(args), "inputs": config_digests(args)}
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
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
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
