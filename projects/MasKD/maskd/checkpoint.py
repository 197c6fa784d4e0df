"""Per-submodule weight loading for MasKD models.

Key layout of MasKD checkpoints (what detectron2's checkpointer writes for the models):

* stage 1 (``MasKDTokenLearner``): ``teacher.*`` with the tokens at
  ``teacher.backbone.tokens.<level>.*``;
* stage 2 (``MasKD``): ``student.*``, ``teacher.*``, ``tokens.<level>.*``, ``align.<level>.*``;
* a tokens-only export: ``tokens.<level>.*``.

:func:`load_checkpoint_dict` routes a checkpoint to the right submodule (see
:class:`MasKDCheckpointer`); :func:`load_weights_strict` loads a file and fails if anything of the
model is left out. Student and teacher keys are those of plain detectron2 models under the ``student.`` /
``teacher.`` prefix (the backbone wrappers are transparent in state dicts).
"""

import logging
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from ._compat import (
    IncompatibleKeys,
    SafeLoadingCheckpointer,
    load_state_into,
    read_checkpoint_file,
)
from .provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    TOKENS_CONFIG_KEY,
    TOKENS_KEY,
    TeacherPrint,
    check_token_provenance,
    checkpoint_teacher_state,
    fingerprint,
    fingerprint_text,
)
from .receptive_tokens import ReceptiveTokens
from .safe_pickle import UnsafePickleError

__all__ = [
    "MasKDCheckpointer",
    "read_checkpoint",
    "load_checkpoint_dict",
    "load_weights_strict",
    "load_tokens",
    "tokens_from_file",
    "extract_tokens_state",
    "TOKEN_PREFIXES",
    "atomic_write",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

# Where receptive tokens live in a stage-1 checkpoint, and in stage-2 checkpoints and exports.
TOKEN_PREFIXES = ("teacher.backbone.tokens.", "tokens.")
_MASKD_PREFIXES = ("student.", "teacher.", "tokens.", "align.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Call ``write(tmp_path)``, then move the result to ``path`` in one rename.

    The file gets the mode that the umask gives new files (0644 under umask 022, as
    ``torch.save`` would write it), and reaches the disk (fsync) before the rename, so that
    after a crash ``path`` is the old file or the complete new one.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass --force (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, os.path.basename(path))  # of a killed earlier write
    # ".<name>.<random>.tmp": never matches the patterns of checkpoints (*.pth, model_*.pth)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(folder, directory=True)


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> List[str]:
    """Delete the temporary files that :func:`atomic_write` leaves in ``folder`` when a process
    is killed while writing (``.<name>.<random>.tmp``), of every file or of ``target`` (a file
    name) only; returns their paths.

    Call it where a run starts writing into ``folder``, from one process only."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    name_pattern = re.escape(target) if target else ".+"
    pattern = re.compile(rf"\.{name_pattern}\.[a-z0-9_]{{8}}\.tmp")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if pattern.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("Removed temporary files of an interrupted run: %s", ", ".join(removed))
    return removed


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
        UnsafePickleError: a .pkl file asks to run code (:mod:`maskd.safe_pickle`).
        RuntimeError: naming ``what``, if the file cannot be downloaded or read.

    Returns:
        dict with at least a "model" entry (name -> tensor or array).
    """
    local = urlparse(path)._replace(query="").geturl()  # without ?matching_heuristics=True
    if "://" not in path and not os.path.isfile(local):
        raise FileNotFoundError(f"{what}: file not found: '{local}'")
    try:
        return read_checkpoint_file(path)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{what}: {e}") from None
    except Exception as e:  # a failed download, a corrupt file: say which setting named it
        verb = "download" if "://" in path else "read"
        raise RuntimeError(f"{what}: could not {verb} '{path}': {type(e).__name__}: {e}") from e


def extract_tokens_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The receptive-token weights of a MasKD checkpoint, keyed ``<level>.<param>``.

    Returns an empty dict if the checkpoint holds none.
    """
    for prefix in TOKEN_PREFIXES:
        found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def load_tokens(
    tokens: nn.ModuleDict,
    path: str,
    what: str = "MODEL.MASKD.TOKENS_WEIGHTS",
    checkpoint: Optional[Dict[str, Any]] = None,
):
    """Load learned receptive tokens (one ``ReceptiveTokens`` per level) from a checkpoint.

    Args:
        tokens: level name -> ReceptiveTokens.
        path: a stage-1 checkpoint as detectron2's checkpointer writes it, a stage-2 checkpoint,
            or a tokens-only export.
        what: the config key or argument naming the file, for messages.
        checkpoint: the file's contents if already read (:func:`read_checkpoint`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, the levels and the shapes, if the tokens do not fit.
    """
    if checkpoint is None:
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
    teacher = tokens_teacher_print(checkpoint["model"], path, what)
    tokens.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    # where they come from, for the provenance check of stage 2 (maskd.provenance)
    tokens.source = path
    tokens.teacher_print = teacher
    logger.info("Loaded receptive tokens for levels %s from %s", levels_file, path)


def _bare(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _print_at(state: Dict[str, Any], weights_key: str, config_key: str) -> TeacherPrint:
    return TeacherPrint(
        fingerprint_text(state.get(weights_key)), fingerprint_text(state.get(config_key))
    )


def tokens_teacher_print(
    state: Dict[str, Any], path: str, what: str = "checkpoint"
) -> TeacherPrint:
    """The fingerprints of the teacher that the receptive tokens of a checkpoint were learned
    for (:mod:`maskd.provenance`): a stage-1 checkpoint's own teacher (checked against the
    teacher weights the file holds), a tokens export's record, a stage-2 checkpoint's record of
    its tokens' teacher (not its own teacher's).

    Args:
        state: the checkpoint's "model" entry.
        path, what: the file and the key naming it, for messages.

    Raises:
        ValueError: a stage-1 checkpoint whose teacher weights are not those its fingerprint
            records (altered, or assembled from two runs).
    """
    state = _bare(state)
    kind = checkpoint_kind(list(state))
    if kind == STAGE2:
        return _print_at(state, TOKENS_KEY, TOKENS_CONFIG_KEY)
    recorded = _print_at(state, FINGERPRINT_KEY, CONFIG_KEY)
    teacher = checkpoint_teacher_state(state)
    if kind == STAGE1 and recorded.weights is not None and teacher:
        actual = fingerprint(teacher)
        if actual != recorded.weights:
            raise ValueError(
                f"{what}: '{path}': its teacher's weights (fingerprint {actual[:16]}...) are not "
                f"those its tokens were learned for ({recorded.weights[:16]}...): the checkpoint "
                "was altered or assembled from two runs"
            )
    return recorded


def tokens_from_file(
    weights: str,
    num_tokens: Optional[int] = None,
    weighted: Optional[bool] = None,
    what: str = "model.tokens.weights",
) -> nn.ModuleDict:
    """Build the learned receptive tokens of a checkpoint, their levels and shapes read from it
    (a LazyConfig-callable builder for :class:`maskd.MasKD`'s ``tokens``).

    Args:
        weights: a stage-1 checkpoint, stage-2 checkpoint or tokens export.
        num_tokens, weighted: if given, what the file must hold (else anything).
        what: the config key naming the file, for messages.

    Returns:
        level -> loaded ReceptiveTokens (T, C from the file; weighted if the file has
        ``weight_head`` tensors), frozen.
    """
    checkpoint = read_checkpoint(weights, what=what)
    state = extract_tokens_state(checkpoint.get("model", {}))
    if not state:
        raise ValueError(f"{what}: '{weights}' holds no receptive tokens")
    channels, counts, heads = {}, {}, {}
    for key, value in state.items():
        level, name = key.split(".", 1)
        if name == "tokens":
            counts[level], channels[level] = tuple(value.shape)
        heads[level] = heads.get(level, False) or name.startswith("weight_head.")
    missing = sorted(set(heads) - set(channels))
    if missing:
        raise ValueError(f"{what}: '{weights}' has no token embeddings for levels {missing}")
    for level in channels:
        if num_tokens is not None and counts[level] != num_tokens:
            raise ValueError(
                f"{what}: '{weights}' has {counts[level]} tokens on level '{level}', "
                f"{num_tokens} were asked for"
            )
        if weighted is not None and heads[level] != weighted:
            raise ValueError(
                f"{what}: the tokens of '{weights}' are {'' if heads[level] else 'not '}weighted "
                f"on level '{level}', weighted={weighted} was asked for"
            )
    tokens = nn.ModuleDict(
        {lv: ReceptiveTokens(channels[lv], counts[lv], heads[lv]) for lv in channels}
    )
    load_tokens(tokens, weights, what, checkpoint)  # the file is read once
    return tokens.requires_grad_(False).eval()


def checkpoint_kind(keys) -> Optional[str]:
    """What a checkpoint's keys say it is: "stage 1 (MasKDTokenLearner)", "stage 2 (MasKD)",
    "tokens export", "MasKD", or None for any other (non-MasKD) checkpoint."""
    keys = [k[len("module.") :] if k.startswith("module.") else k for k in keys]
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
TOKENS_EXPORT = "tokens export"


def _model_kind(model: nn.Module) -> Optional[str]:
    if not hasattr(model, "teacher"):
        return None
    return STAGE2 if hasattr(model, "student") else STAGE1


def load_checkpoint_dict(model: nn.Module, checkpoint: Dict[str, Any]) -> IncompatibleKeys:
    """Load a checkpoint dict (``{"model": state, ...}``, as detectron2 reads files) into the
    submodule of ``model`` it is meant for:

    * a MasKD checkpoint into a MasKD model of the same stage: the whole model (resume,
      evaluation), except that a teacher loaded from ``TEACHER.WEIGHTS`` stays: the
      checkpoint's copy must be that teacher (same fingerprint), or this fails; a checkpoint of
      the other stage fails, naming both;
    * any other checkpoint into a model with a teacher: it is a student checkpoint (ImageNet
      weights, a detectron2 model): ``model.student`` only, so name-matching heuristics never
      reach the teacher; a stage-1 model has no student and ignores it (with a warning);
    * a stage-2 checkpoint into a plain model (no teacher): its ``student.*`` weights, so a
      stage-2 checkpoint evaluates with the student's own config; a stage-1 checkpoint fails;
    * anything else into a plain model: as detectron2 does.
    """
    keys = list(checkpoint["model"])
    kind, target = checkpoint_kind(keys), _model_kind(model)
    if target is None:
        if kind == STAGE2:
            logger.info("Loading the student of a MasKD stage-2 checkpoint")
            checkpoint["model"] = {
                k.split("student.", 1)[1]: v
                for k, v in checkpoint["model"].items()
                if k.split("module.", 1)[-1].startswith("student.")
            }
        elif kind is not None:
            raise ValueError(
                f"this is a {kind} checkpoint, which holds no weights of a plain "
                f"{type(model).__name__} (a teacher, a detectron2 model, or the student that a "
                f"{STAGE2} config evaluates): give that model's own checkpoint (for a student "
                "of stage 2: the stage-2 checkpoint)"
            )
        return load_state_into(model, checkpoint)
    if kind is None:
        student = getattr(model, "student", None)
        if student is None:
            logger.warning(
                "%s has no student: the weights of a non-MasKD checkpoint are not loaded "
                "(MODEL.WEIGHTS is for the student of stage 2; the teacher comes from "
                "MODEL.MASKD.TEACHER.WEIGHTS)",
                type(model).__name__,
            )
            checkpoint.pop("model")
            return IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])
        logger.info("Loading a student checkpoint into %s.student", type(model).__name__)
        return load_state_into(student, checkpoint)
    if kind != target:
        raise ValueError(
            f"this is a {kind} checkpoint, but the model is {target}: give the checkpoint of "
            "the model's own stage (stage 1 writes the tokens, stage 2 the student)"
        )
    if getattr(model, "teacher_from_checkpoint", False):
        return load_state_into(model, checkpoint)  # the checkpoint brings the teacher
    _keep_configured_teacher(model, checkpoint)
    if target == STAGE2:
        _keep_configured_tokens(model, checkpoint)
    incompatible = load_state_into(model, checkpoint)
    teacher_keys = {f"teacher.{k}" for k in model.teacher.state_dict()}
    teacher_keys |= set(_PROVENANCE_KEYS)
    if target == STAGE2:
        teacher_keys |= {f"tokens.{k}" for k in model.tokens.state_dict()}
    # the teacher's (and stage 2's tokens') keys are not missing: the configured ones are kept
    # on purpose
    return incompatible._replace(
        missing_keys=[
            k
            for k in incompatible.missing_keys
            if k not in teacher_keys or k.startswith(TOKEN_PREFIXES[0])
        ]
    )


_PROVENANCE_KEYS = (FINGERPRINT_KEY, CONFIG_KEY, TOKENS_KEY, TOKENS_CONFIG_KEY)


def _keep_configured_teacher(model: nn.Module, checkpoint: Dict[str, Any]) -> None:
    """Check that the checkpoint's teacher is the configured one (weights and, where the file
    records it, configuration), then drop it (and the fingerprints) from the checkpoint, so the
    configured teacher stays."""
    state = checkpoint["model"]
    ours = fingerprint_text(getattr(model, FINGERPRINT_KEY))
    theirs = fingerprint(checkpoint_teacher_state(state))
    if ours is not None and theirs != ours:
        raise ValueError(
            f"the checkpoint's teacher is not the configured teacher (MODEL.MASKD.TEACHER): "
            f"fingerprints {theirs[:16]}... (checkpoint) and {ours[:16]}... (configured). Resume "
            "or evaluate with the teacher the run was made with"
        )
    ours_config = fingerprint_text(getattr(model, CONFIG_KEY, None))
    theirs_config = fingerprint_text(_bare(state).get(CONFIG_KEY))
    if None not in (ours_config, theirs_config) and ours_config != theirs_config:
        raise ValueError(
            "the checkpoint's teacher was configured otherwise than the configured teacher "
            "(MODEL.MASKD.TEACHER.CONFIG_FILE / OPTS): same weights, but other preprocessing "
            "(PIXEL_MEAN/STD, INPUT.FORMAT) or backbone settings (config fingerprints "
            f"{theirs_config[:16]}... and {ours_config[:16]}...). Resume or evaluate with the "
            "teacher config the run was made with"
        )
    for key in list(state):
        bare = key[len("module.") :] if key.startswith("module.") else key
        if bare in (FINGERPRINT_KEY, CONFIG_KEY) or (
            bare.startswith("teacher.") and not bare.startswith(TOKEN_PREFIXES[0])
        ):
            del state[key]


def _keep_configured_tokens(model: nn.Module, checkpoint: Dict[str, Any]) -> None:
    """Stage 2: a checkpoint (``MODEL.WEIGHTS``, ``--resume``) never replaces the configured
    receptive tokens unchecked. Learned tokens (``MODEL.MASKD.TOKENS_WEIGHTS``, checked against
    the teacher when they were loaded) must equal the checkpoint's, which are then dropped from
    it so the configured ones stay; untrained configured tokens (an ablation) are replaced by
    the checkpoint's after the same provenance check that tokens from a file get."""
    state = checkpoint["model"]
    ours = model.tokens.state_dict()
    theirs = {
        k.split("tokens.", 1)[1]: v
        for k, v in _bare(state).items()
        if k.startswith(TOKEN_PREFIXES[1])
    }
    differ = sorted(
        k
        for k in set(ours) | set(theirs)
        if k not in ours
        or k not in theirs
        or tuple(theirs[k].shape) != tuple(ours[k].shape)
        or not torch.equal(torch.as_tensor(theirs[k]).to(ours[k]), ours[k])
    )
    source = getattr(model.tokens, "source", None)
    if differ and source is not None:
        raise ValueError(
            "the checkpoint's receptive tokens are not the configured ones "
            f"(MODEL.MASKD.TOKENS_WEIGHTS: those of '{source}'; differing: {_short(differ)}). A "
            "checkpoint does not replace learned tokens: resume or fine-tune with the "
            "TOKENS_WEIGHTS the run was made with"
        )
    if differ and set(theirs) != set(ours):
        raise ValueError(
            f"the checkpoint's receptive tokens do not fit the model's: keys {_short(differ)}"
        )
    if differ:
        # the configured tokens are untrained (an ablation): the checkpoint's take their place,
        # after the check that tokens from a file get
        check_token_provenance(
            "the checkpoint's tokens",
            _print_at(_bare(state), TOKENS_KEY, TOKENS_CONFIG_KEY),
            TeacherPrint(
                fingerprint_text(getattr(model, FINGERPRINT_KEY)),
                fingerprint_text(getattr(model, CONFIG_KEY)),
            ),
            getattr(model, "allow_tokens_of_other_teacher", False),
        )
        logger.info("The checkpoint's receptive tokens replace the untrained configured ones")
        return
    for key in list(state):
        bare = key[len("module.") :] if key.startswith("module.") else key
        if bare.startswith(TOKEN_PREFIXES[1]) or bare in (TOKENS_KEY, TOKENS_CONFIG_KEY):
            del state[key]


def load_weights_strict(model: nn.Module, path: str, what: str, ignore: Sequence[str] = ()) -> None:
    """Load a checkpoint into ``model`` (routed as :func:`load_checkpoint_dict` does) and fail if
    anything does not fit.

    Accepts every format detectron2's checkpointer reads (.pth with a "model" entry, detectron2
    model-zoo .pkl, detectron2:// and https:// paths).

    Args:
        model: the module to load into (e.g. a teacher, or a model to evaluate).
        path: the checkpoint.
        what: the config key or argument that named the file, for error messages.
        ignore: key prefixes of ``model`` that the checkpoint need not hold.

    Raises:
        FileNotFoundError: if ``path`` is empty or a local file does not exist.
        ValueError: naming the file and the keys, if keys are missing or shapes differ.
    """
    if not path:
        raise FileNotFoundError(f"{what} is empty")
    checkpoint = read_checkpoint(path, model, what)
    if "model" not in checkpoint:
        raise ValueError(f"{what}: '{path}' holds no model weights")
    _check_dtypes(model, checkpoint["model"], path, what)
    try:
        incompatible = load_checkpoint_dict(model, checkpoint)
    except ValueError as e:
        raise ValueError(f"{what}: '{path}': {e}") from None
    missing = [k for k in incompatible.missing_keys if not k.startswith(tuple(ignore))]
    # pixel_mean/std are buffers that come from the config; old checkpoints lack them, and the
    # teacher fingerprint (files made before it was recorded).
    missing = [k for k in missing if k.split(".")[-1] not in ("pixel_mean", "pixel_std")]
    missing = [k for k in missing if k not in _PROVENANCE_KEYS]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (file {a}, model {b})" for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"shape mismatches: {_short(shapes)}")
    if problems:
        raise ValueError(
            f"{what}: '{path}' does not fit the model: " + "; ".join(problems) + ". "
            "Check that the config and the weights describe the same model."
        )
    if incompatible.unexpected_keys:
        logger.warning(
            "%s: '%s' has keys the model does not use: %s",
            what,
            path,
            _short(incompatible.unexpected_keys),
        )
    logger.info("Loaded %s from %s", what, path)


def _check_dtypes(model: nn.Module, state: Dict[str, Any], path: str, what: str) -> None:
    """Fail, naming the keys, where the file holds integers for a floating-point weight of the
    model or the reverse (loading would convert them silently). Half precision for float32
    weights is fine: the values load exactly."""

    def floating(value) -> Optional[bool]:
        if isinstance(value, torch.Tensor):
            return value.is_floating_point() or value.is_complex()
        kind = getattr(getattr(value, "dtype", None), "kind", None)
        return None if kind is None else kind in "fc"

    ours = model.state_dict()
    problems = []
    for key, value in _bare(state).items():
        if key in ours and floating(value) is not None:
            if floating(value) != floating(ours[key]):
                dtype = getattr(value, "dtype", type(value).__name__)
                problems.append(f"{key} ({dtype} in the file, {ours[key].dtype} in the model)")
    if problems:
        raise ValueError(
            f"{what}: '{path}' holds weights of another kind of number than the model's: "
            f"{_short(problems)}; loading would convert them silently. Is it the right file?"
        )


def _short(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class MasKDCheckpointer(SafeLoadingCheckpointer):
    """A DetectionCheckpointer that reads files without running code from them
    (:class:`~maskd._compat.SafeLoadingCheckpointer`), loads weights into the submodule they
    are meant for (:func:`load_checkpoint_dict`) and saves atomically.

    For plain detectron2 models and plain checkpoints it is DetectionCheckpointer. A
    checkpointer that saves (the main process) removes, when it is made, the temporary files
    that a killed run left in its folder.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        if self.save_dir and self.save_to_disk:
            remove_stale_temporaries(self.save_dir)

    def _load_model(self, checkpoint):
        return load_checkpoint_dict(self.model, checkpoint)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """``Checkpointer.resume_or_load``, its errors naming the file and what named it (the
        last checkpoint of ``--resume``, or ``MODEL.WEIGHTS`` / ``train.init_checkpoint``)."""
        if resume and self.has_checkpoint():
            what, path = "--resume (last_checkpoint)", self.get_checkpoint_file()
        else:
            what = "MODEL.WEIGHTS (train.init_checkpoint)"
        try:
            return super().resume_or_load(path, resume=resume)
        except ValueError as e:
            raise ValueError(f"{what}: '{path}': {e}") from None

    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``, but atomic: a killed job never leaves a truncated
        checkpoint, and ``last_checkpoint`` only ever names a complete file.

        Copied from ``fvcore.common.checkpoint.Checkpointer.save`` (fvcore 0.1.5), changed in
        one point: the file is written by :func:`atomic_write`."""
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
        """``Checkpointer.tag_last_checkpoint`` (fvcore 0.1.5), written atomically."""
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda tmp: write_text(tmp, last_filename_basename),
            overwrite=True,
        )
