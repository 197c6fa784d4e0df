"""Per-submodule weight loading for MasKD models.

Key layout of MasKD checkpoints (what detectron2's checkpointer writes for the models):

* stage 1 (``MasKDTokenLearner``): ``teacher.*`` with the tokens at
  ``teacher.backbone.tokens.<level>.*``;
* stage 2 (``MasKD``): ``student.*``, ``teacher.*``, ``tokens.<level>.*``, ``align.<level>.*``;
* a tokens-only export: ``tokens.<level>.*``.

Student and teacher keys are those of plain detectron2 models under the ``student.`` /
``teacher.`` prefix (the backbone wrappers are transparent in state dicts).
"""

import logging
import os
import tempfile
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

__all__ = [
    "MasKDCheckpointer",
    "read_checkpoint",
    "load_tokens",
    "extract_tokens_state",
    "TOKEN_PREFIXES",
    "atomic_write",
]

logger = logging.getLogger(__name__)

# Where receptive tokens live in a stage-1 checkpoint, and in stage-2 checkpoints and exports.
TOKEN_PREFIXES = ("teacher.backbone.tokens.", "tokens.")
_MASKD_PREFIXES = ("student.", "teacher.", "tokens.", "align.")


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Call ``write(tmp_path)``, then move the result to ``path`` in one rename.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass --force (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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

    Returns:
        dict with at least a "model" entry (name -> tensor or array).
    """
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: '{path}'")
    checkpointer = DetectionCheckpointer(model if model is not None else nn.Module())
    parsed = urlparse(path)
    checkpointer._parsed_url_during_load = parsed
    try:
        local = checkpointer.path_manager.get_local_path(parsed._replace(query="").geturl())
        return checkpointer._load_file(local)
    finally:
        checkpointer._parsed_url_during_load = None


def extract_tokens_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The receptive-token weights of a MasKD checkpoint, keyed ``<level>.<param>``.

    Returns an empty dict if the checkpoint holds none.
    """
    for prefix in TOKEN_PREFIXES:
        found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def load_tokens(tokens: nn.ModuleDict, path: str, what: str = "MODEL.MASKD.TOKENS_WEIGHTS"):
    """Load learned receptive tokens (one ``ReceptiveTokens`` per level) from a checkpoint.

    Args:
        tokens: level name -> ReceptiveTokens.
        path: a stage-1 checkpoint as detectron2's checkpointer writes it, a stage-2 checkpoint,
            or a tokens-only export.
        what: the config key or argument naming the file, for messages.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, the levels and the shapes, if the tokens do not fit.
    """
    checkpoint = read_checkpoint(path, what=what)
    state = extract_tokens_state(checkpoint.get("model", {}))
    if not state:
        raise ValueError(
            f"{what}: '{path}' holds no receptive tokens (expected keys "
            f"'{TOKEN_PREFIXES[0]}<level>.*' of a stage-1 checkpoint or "
            f"'{TOKEN_PREFIXES[1]}<level>.*' of a tokens export)"
        )
    levels_file = sorted({k.split(".", 1)[0] for k in state})
    if sorted(tokens.keys()) != levels_file:
        raise ValueError(
            f"{what}: '{path}' has tokens for levels {levels_file}, "
            f"but the model distils levels {sorted(tokens.keys())}"
        )
    expected = tokens.state_dict()
    problems = []
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            problems.append(f"{key} missing from the file")
        elif key not in expected:
            problems.append(f"{key} not in the model (weighted tokens in one, not the other?)")
        elif tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
                + (" (tokens x channels)" if key.endswith(".tokens") else "")
            )
    if problems:
        raise ValueError(
            f"{what}: the receptive tokens in '{path}' do not fit the model: " + "; ".join(problems)
        )
    tokens.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    logger.info("Loaded receptive tokens for levels %s from %s", levels_file, path)


class MasKDCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that loads outside weights into the right submodule.

    For models without a teacher (plain detectron2 models) it is DetectionCheckpointer.

    A MasKD checkpoint (keys under ``student.``, ``teacher.``, ``tokens.``, ``align.``) loads
    into the whole model, as usual (resume, evaluation). Any other checkpoint, such as the
    ImageNet weights or a detectron2 model named by ``MODEL.WEIGHTS``, is a student checkpoint:
    it loads into ``model.student`` only, so name-matching heuristics can never reach the
    teacher. The stage-1 model has no student and ignores such a file (with a warning).
    """

    def _load_model(self, checkpoint):
        keys = [k[len("module.") :] if k.startswith("module.") else k for k in checkpoint["model"]]
        if not hasattr(self.model, "teacher") or any(k.startswith(_MASKD_PREFIXES) for k in keys):
            return super()._load_model(checkpoint)  # a plain model, or a MasKD checkpoint
        student = getattr(self.model, "student", None)
        if student is None:
            logger.warning(
                "%s has no student: the weights of a non-MasKD checkpoint are not loaded "
                "(MODEL.WEIGHTS is for the student of stage 2; the teacher comes from "
                "MODEL.MASKD.TEACHER.WEIGHTS)",
                type(self.model).__name__,
            )
            checkpoint.pop("model")
            return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])
        logger.info("Loading a student checkpoint into %s.student", type(self.model).__name__)
        return DetectionCheckpointer(student)._load_model(checkpoint)

    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``, but atomic: a killed job never leaves a truncated
        checkpoint, and ``last_checkpoint`` only ever names a complete file."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda tmp: torch.save(data, tmp), overwrite=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda tmp: write_text(tmp, last_filename_basename),
            overwrite=True,
        )
