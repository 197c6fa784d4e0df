"""Loading a checkpoint into the MasKD submodule it is meant for, keeping the configured teacher
and tokens, and strict loading that names what does not fit."""

import logging
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .._compat import IncompatibleKeys, load_state_into
from .format import (
    STAGE1,
    STAGE2,
    TOKEN_PREFIXES,
    bare_key,
    bare_state,
    checkpoint_kind,
    model_stage,
    print_at,
    read_checkpoint,
    short_list,
)
from .provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    STUDENT_PREPROCESSING_KEY,
    TOKENS_CONFIG_KEY,
    TOKENS_KEY,
    TeacherPrint,
    check_student_preprocessing,
    check_token_provenance,
    checkpoint_teacher_state,
    fingerprint,
    fingerprint_text,
)

__all__ = ["load_checkpoint_dict", "load_weights_strict"]

logger = logging.getLogger(__name__)


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
    kind, target = checkpoint_kind(keys), model_stage(model)
    if target is None:
        if kind == STAGE2:
            logger.info("Loading the student of a MasKD stage-2 checkpoint")
            checkpoint["model"] = {
                k.split("student.", 1)[1]: v
                for k, v in checkpoint["model"].items()
                if bare_key(k).startswith("student.")
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
        check_student_preprocessing(
            bare_state(checkpoint["model"]).get(STUDENT_PREPROCESSING_KEY),
            getattr(model, STUDENT_PREPROCESSING_KEY).cpu(),
            "the checkpoint",
        )
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


_PROVENANCE_KEYS = (
    FINGERPRINT_KEY,
    CONFIG_KEY,
    TOKENS_KEY,
    TOKENS_CONFIG_KEY,
    STUDENT_PREPROCESSING_KEY,
)


def _keep_configured_teacher(model: nn.Module, checkpoint: Dict[str, Any]) -> None:
    """Check that the checkpoint's teacher is the configured one (weights and, where the file
    records it, configuration), then drop it (and the fingerprints) from the checkpoint, so the
    configured teacher stays."""
    state = checkpoint["model"]
    ours = fingerprint_text(getattr(model, FINGERPRINT_KEY))
    theirs = fingerprint(checkpoint_teacher_state(bare_state(state)))
    if ours is not None and theirs != ours:
        raise ValueError(
            f"the checkpoint's teacher is not the configured teacher (MODEL.MASKD.TEACHER): "
            f"fingerprints {theirs[:16]}... (checkpoint) and {ours[:16]}... (configured). Resume "
            "or evaluate with the teacher the run was made with"
        )
    ours_config = fingerprint_text(getattr(model, CONFIG_KEY, None))
    theirs_config = fingerprint_text(bare_state(state).get(CONFIG_KEY))
    if None not in (ours_config, theirs_config) and ours_config != theirs_config:
        raise ValueError(
            "the checkpoint's teacher was configured otherwise than the configured teacher "
            "(MODEL.MASKD.TEACHER.CONFIG_FILE / OPTS): same weights, but other preprocessing "
            "(PIXEL_MEAN/STD, INPUT.FORMAT) or backbone settings (config fingerprints "
            f"{theirs_config[:16]}... and {ours_config[:16]}...). Resume or evaluate with the "
            "teacher config the run was made with"
        )
    for key in list(state):
        bare = bare_key(key)
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
        for k, v in bare_state(state).items()
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
            f"(MODEL.MASKD.TOKENS_WEIGHTS: those of '{source}'; differing: {short_list(differ)}). A "
            "checkpoint does not replace learned tokens: resume or fine-tune with the "
            "TOKENS_WEIGHTS the run was made with"
        )
    if differ and set(theirs) != set(ours):
        raise ValueError(
            f"the checkpoint's receptive tokens do not fit the model's: keys {short_list(differ)}"
        )
    if differ:
        # the configured tokens are untrained (an ablation): the checkpoint's take their place,
        # after the check that tokens from a file get
        check_token_provenance(
            "the checkpoint's tokens",
            print_at(bare_state(state), TOKENS_KEY, TOKENS_CONFIG_KEY),
            TeacherPrint(
                fingerprint_text(getattr(model, FINGERPRINT_KEY)),
                fingerprint_text(getattr(model, CONFIG_KEY)),
            ),
            getattr(model, "allow_tokens_of_other_teacher", False),
            untrained_ok=True,  # a random-token run resumed: its own untrained tokens
        )
        logger.info("The checkpoint's receptive tokens replace the untrained configured ones")
        return
    for key in list(state):
        bare = bare_key(key)
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
    if model_stage(model) == STAGE1 and checkpoint_kind(list(checkpoint["model"])) is None:
        # load_checkpoint_dict would load nothing (a stage-1 model has no student) and leave the
        # model as it was built: for evaluation, untrained
        raise ValueError(
            f"{what}: '{path}' is not a MasKD checkpoint, and a {type(model).__name__} (stage 1) "
            "loads only stage-1 checkpoints (the teacher with its tokens, e.g. the stage-1 run's "
            "model_final.pth); a plain teacher checkpoint is evaluated with the teacher's own "
            "config"
        )
    try:
        incompatible = load_checkpoint_dict(model, checkpoint)
    except ValueError as e:
        raise ValueError(f"{what}: '{path}': {e}") from None
    missing = [k for k in incompatible.missing_keys if not k.startswith(tuple(ignore))]
    # pixel_mean/std are buffers that come from the config (detectron2's checkpoints lack them),
    # as do the fingerprints of files made by other code.
    missing = [k for k in missing if k.split(".")[-1] not in ("pixel_mean", "pixel_std")]
    missing = [k for k in missing if k not in _PROVENANCE_KEYS]
    problems = []
    if missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (file {a}, model {b})" for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"shape mismatches: {short_list(shapes)}")
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
            short_list(incompatible.unexpected_keys),
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
    for key, value in bare_state(state).items():
        if key in ours and floating(value) is not None:
            if floating(value) != floating(ours[key]):
                dtype = getattr(value, "dtype", type(value).__name__)
                problems.append(f"{key} ({dtype} in the file, {ours[key].dtype} in the model)")
    if problems:
        raise ValueError(
            f"{what}: '{path}' holds weights of another kind of number than the model's: "
            f"{short_list(problems)}; loading would convert them silently. Is it the right file?"
        )
