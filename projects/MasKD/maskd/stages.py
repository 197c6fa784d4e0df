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
        cmd = [self.python, "-m", TRAIN_MODULE, *self.imports, *self.register, *self.launch]
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
