"""What a MasKD checkpoint is: reading one (without running code from it), what kind it is
from its keys, and where its tokens and fingerprints live.

Key layout of MasKD checkpoints (what detectron2's checkpointer writes for the models):

* stage 1 (``MasKDTokenLearner``): ``teacher.*`` with the tokens at
  ``teacher.backbone.tokens.<level>.*``;
* stage 2 (``MasKD``): ``student.*``, ``teacher.*``, ``tokens.<level>.*``, ``align.<level>.*``;
* a tokens-only export: ``tokens.<level>.*``.

Student and teacher keys are those of plain detectron2 models under the ``student.`` /
``teacher.`` prefix (the backbone wrappers are transparent in state dicts); the fingerprints of
:mod:`maskd.checkpoint.provenance` are top-level keys.
"""

import os
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from torch import nn

from .._compat import read_checkpoint_file
from .provenance import TeacherPrint, fingerprint_text
from .safe_pickle import UnsafePickleError

__all__ = [
    "read_checkpoint",
    "check_local_file",
    "checkpoint_kind",
    "bare_key",
    "bare_state",
    "print_at",
    "short_list",
    "TOKEN_PREFIXES",
    "STAGE1",
    "STAGE2",
    "TOKENS_EXPORT",
]

# Where receptive tokens live in a stage-1 checkpoint, and in stage-2 checkpoints and exports.
TOKEN_PREFIXES = ("teacher.backbone.tokens.", "tokens.")
_MASKD_PREFIXES = ("student.", "teacher.", "tokens.", "align.")


def read_checkpoint(
    path: str, model: Optional[nn.Module] = None, what: str = "checkpoint"
) -> Dict[str, Any]:
    """Read a checkpoint file the way ``DetectionCheckpointer.load`` does, without loading it.

    Handles .pth files, detectron2 model-zoo and Caffe2 .pkl files, ``detectron2://`` and URL
    paths, and the ``?matching_heuristics=True`` query.

    Args:
        path: the file or URL.
        model: the model the checkpoint is meant for (only used for logging).
        what: the config key or argument naming the file, for the error message.

    Raises:
        FileNotFoundError: naming ``what`` and the path, if a local file does not exist.
        UnsafePickleError: a .pkl file asks to run code (:mod:`maskd.checkpoint.safe_pickle`).
        RuntimeError: naming ``what``, if the file cannot be downloaded or read.

    Returns:
        dict with at least a "model" entry (name -> tensor or array).
    """
    check_local_file(path, what)
    try:
        return read_checkpoint_file(path)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{what}: {e}") from None
    except Exception as e:  # a failed download, a corrupt file: say which setting named it
        verb = "download" if "://" in path else "read"
        raise RuntimeError(f"{what}: could not {verb} '{path}': {type(e).__name__}: {e}") from e


def check_local_file(path: str, what: str) -> None:
    """Fail, naming ``what``, if ``path`` (without a ``?matching_heuristics=True`` query) is a
    local file that does not exist; URLs and ``detectron2://`` paths are left to the download.

    Raises:
        FileNotFoundError: naming ``what`` and the path.
    """
    local = urlparse(path)._replace(query="").geturl()
    if "://" not in path and not os.path.isfile(local):
        raise FileNotFoundError(f"{what}: file not found: '{local}'")


def checkpoint_kind(keys) -> Optional[str]:
    """What a checkpoint's keys say it is: "stage 1 (MasKDTokenLearner)", "stage 2 (MasKD)",
    "tokens export", "MasKD", or None for any other (non-MasKD) checkpoint."""
    keys = [bare_key(k) for k in keys]
    if any(k.startswith("student.") for k in keys):
        return STAGE2
    if any(k.startswith(TOKEN_PREFIXES[0]) for k in keys):
        return STAGE1
    if any(k.startswith(TOKEN_PREFIXES[1]) for k in keys) and not any(
        k.startswith("teacher.") for k in keys
    ):
        return TOKENS_EXPORT
    if any(k.startswith(_MASKD_PREFIXES) for k in keys):
        return "MasKD"
    return None


STAGE1, STAGE2 = "stage 1 (MasKDTokenLearner)", "stage 2 (MasKD)"


def model_stage(model: nn.Module) -> Optional[str]:
    """Which MasKD stage a model (DDP-unwrapped) is: :data:`STAGE1` (a teacher, no student:
    :class:`maskd.MasKDTokenLearner` and its subclasses), :data:`STAGE2` (a teacher and a
    student: :class:`maskd.MasKD`), or None (any other model). The one test of it."""
    if not hasattr(model, "teacher"):
        return None
    return STAGE2 if hasattr(model, "student") else STAGE1


TOKENS_EXPORT = "tokens export"


def bare_key(key: str) -> str:
    """A state-dict key without the ``module.`` prefix of DDP-wrapped checkpoints."""
    return key[len("module.") :] if key.startswith("module.") else key


def bare_state(state: Dict[str, Any]) -> Dict[str, Any]:
    return {bare_key(k): v for k, v in state.items()}


def print_at(state: Dict[str, Any], weights_key: str, config_key: str) -> TeacherPrint:
    return TeacherPrint(
        fingerprint_text(state.get(weights_key)), fingerprint_text(state.get(config_key))
    )


def short_list(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
