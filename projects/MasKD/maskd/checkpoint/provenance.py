"""Which teacher a set of receptive tokens was learned for.

Tokens are meaningful only on the features of the teacher they were learned with, and those
features depend on the teacher's weights and on how it is configured: its preprocessing
(``PIXEL_MEAN/STD``, channel order) and its backbone (e.g. the FPN's fuse type). A teacher is
identified by two SHA-256 fingerprints: of its weights and buffers (:func:`fingerprint`, key
:data:`FINGERPRINT_KEY`) and of its preprocessing and backbone configuration
(:func:`config_fingerprint`, key :data:`CONFIG_KEY`).

Where they are kept:

* a stage-1 model (and so its checkpoints) holds its teacher's two fingerprints beside the
  tokens it learns;
* a tokens export holds the fingerprints of the teacher the tokens were learned for;
* a stage-2 model holds its own teacher's fingerprints and, separately, those its tokens came
  with (:data:`TOKENS_KEY`, :data:`TOKENS_CONFIG_KEY`), so tokens taken from a stage-2
  checkpoint (or exported from it) stay bound to the teacher they were learned for, even if the
  stage-2 run was allowed to use them with another one.

Stage 2 and the tokens export compare the tokens' fingerprints with the teacher at hand and
refuse a mismatch, unless told otherwise (``MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER``).
Untrained tokens (the random-token ablation) are recorded as such (:data:`UNTRAINED`): they
were learned for no teacher, and a file of them is refused as tokens like another teacher's.

A fingerprint guards against mistakes (the wrong file, a changed config, tokens passed on
through a stage-2 checkpoint), not against forgery: anyone can write any fingerprint into a
file, and a file without fingerprints (made by other code, or edited) loads with a warning.
"""

import hashlib
import json
import logging
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_KEY",
    "CONFIG_KEY",
    "TOKENS_KEY",
    "TOKENS_CONFIG_KEY",
    "UNTRAINED",
    "STUDENT_PREPROCESSING_KEY",
    "student_preprocessing",
    "TeacherPrint",
    "check_token_provenance",
    "config_fingerprint",
    "teacher_print",
    "fingerprint",
    "fingerprint_tensor",
    "fingerprint_text",
    "checkpoint_teacher_state",
]

# Top-level keys of the fingerprints in stage-1, stage-2 and token-export state dicts: of the
# model's teacher (stage 1, stage 2) or of the tokens' teacher (export), weights and config; of
# the teacher the tokens of a stage-2 model were learned for.
FINGERPRINT_KEY = "teacher_fingerprint"
CONFIG_KEY = "teacher_config_fingerprint"
TOKENS_KEY = "tokens_teacher_fingerprint"
TOKENS_CONFIG_KEY = "tokens_teacher_config_fingerprint"
# A stage-2 model's record of its student's preprocessing: PIXEL_MEAN then PIXEL_STD, (2C,),
# which detectron2 models keep as non-persistent buffers (not in their checkpoints).
STUDENT_PREPROCESSING_KEY = "student_preprocessing"
# The "teacher fingerprint" of tokens that no teacher trained (the random-token ablation).
UNTRAINED = hashlib.sha256(b"maskd: untrained receptive tokens").hexdigest()
# Keys of a teacher's state dict that are not the teacher's (stage 1 keeps its tokens there).
_NOT_TEACHER = ("backbone.tokens.",)


class TeacherPrint(NamedTuple):
    """A teacher's two fingerprints (hex); None where not known (a file without them: made by
    other code, or edited)."""

    weights: Optional[str]
    config: Optional[str]


def fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """The hex SHA-256 of a teacher's state dict: every key (but the tokens) in sorted order,
    with its dtype, shape and bytes. Equal for the same weights on any device; half-precision
    values count as the float32 values they load as (a teacher loaded from an fp16 file has
    the file's fingerprint)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith(_NOT_TEACHER)):
        value = torch.as_tensor(state[key]).detach().cpu().contiguous()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        h.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


# attributes every nn.Module has (its parameters, hooks, training flag): not configuration
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}


_NOT_SIMPLE = object()


def _simple(value):
    """``value`` (tuples as lists) if it is made of None, bools, numbers and strings only, else
    :data:`_NOT_SIMPLE`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_simple(v) for v in value]
        return _NOT_SIMPLE if any(i is _NOT_SIMPLE for i in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _simple(v) for k, v in value.items()}
        return _NOT_SIMPLE if any(i is _NOT_SIMPLE for i in items.values()) else items
    return _NOT_SIMPLE


def config_fingerprint(teacher: nn.Module) -> str:
    """The hex SHA-256 of what, besides its weights, decides a teacher's features: its
    preprocessing (``pixel_mean``, ``pixel_std``, ``input_format``) and its backbone's
    configuration (every backbone module's class and its attributes made of numbers, strings
    and bools: channels, strides, kernel sizes, norms, the FPN's fuse type, ...).

    Call it on the teacher as built, before any wrapper is put around its backbone."""
    description = {
        "input_format": getattr(teacher, "input_format", None),
        "pixel_mean": _buffer_list(teacher, "pixel_mean"),
        "pixel_std": _buffer_list(teacher, "pixel_std"),
        "backbone": [
            [name, type(module).__qualname__, _module_settings(module)]
            for name, module in teacher.backbone.named_modules()
        ],
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _buffer_list(module: nn.Module, name: str):
    value = getattr(module, name, None)
    return None if value is None else torch.as_tensor(value).float().flatten().tolist()


def _module_settings(module: nn.Module) -> dict:
    out = {}
    for key, value in sorted(vars(module).items()):
        if key in _MODULE_INTERNALS:
            continue
        simple = _simple(value)
        if simple is not _NOT_SIMPLE:
            out[key] = simple
    return out


def teacher_print(teacher: nn.Module) -> TeacherPrint:
    """Both fingerprints of a built teacher (its weights as they are now)."""
    return TeacherPrint(fingerprint(teacher.state_dict()), config_fingerprint(teacher))


def fingerprint_tensor(hex_digest: Optional[str]) -> torch.Tensor:
    """A fingerprint as a (32,) uint8 tensor, to live in state dicts as a buffer; all zeros
    for None (not known)."""
    if hex_digest is None:
        return torch.zeros(32, dtype=torch.uint8)
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


def fingerprint_text(tensor: Optional[torch.Tensor]) -> Optional[str]:
    """The hex form of a fingerprint buffer; None for None or the all-zero "unknown" value."""
    if tensor is None:
        return None
    data = bytes(torch.as_tensor(tensor).to(torch.uint8).tolist())
    return None if not any(data) else data.hex()


def student_preprocessing(student: nn.Module) -> torch.Tensor:
    """A student's ``pixel_mean`` then ``pixel_std``, flattened, (2C,) float32; empty if it has
    none."""
    mean, std = getattr(student, "pixel_mean", None), getattr(student, "pixel_std", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return torch.zeros(0)
    return torch.cat([mean.detach().flatten(), std.detach().flatten()]).float().cpu().clone()


def check_student_preprocessing(
    recorded: Optional[torch.Tensor], ours: torch.Tensor, what: str
) -> None:
    """Fail, naming both, where a checkpoint's student was trained with other
    ``PIXEL_MEAN``/``PIXEL_STD`` than the config gives (``recorded`` None: not recorded)."""
    if recorded is None or not recorded.numel() or not ours.numel():
        return
    recorded = torch.as_tensor(recorded).float().flatten().cpu()
    if recorded.shape != ours.shape or not torch.allclose(recorded, ours):
        half = len(recorded) // 2
        raise ValueError(
            f"{what}: the student was trained with MODEL.PIXEL_MEAN {recorded[:half].tolist()} "
            f"and PIXEL_STD {recorded[half:].tolist()}, the config gives "
            f"{ours[: len(ours) // 2].tolist()} and {ours[len(ours) // 2 :].tolist()}: give "
            "the config (and overrides) the checkpoint was trained with"
        )


def checkpoint_teacher_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The teacher's part of a MasKD checkpoint's state dict (``teacher.*``, prefix removed),
    whose keys are bare (:func:`maskd.checkpoint.format.bare_state`: no DDP ``module.``)."""
    return {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}


def check_token_provenance(
    source: Optional[str],
    theirs: TeacherPrint,
    ours: TeacherPrint,
    allow_other: bool,
    untrained_ok: bool = False,
) -> None:
    """Refuse tokens learned for another teacher, or for this one configured otherwise, or
    never learned (:data:`UNTRAINED`).

    Args:
        source: where the tokens come from (a path), for messages; None for tokens built in
            the process (random tokens, an ablation): nothing to compare.
        theirs: the fingerprints of the teacher the tokens were learned for, as their file
            records them (None where it records none: a file made by other code, or edited).
        ours: the fingerprints of the teacher at hand.
        allow_other: only warn on a mismatch.
        untrained_ok: untrained tokens are expected (a random-token run resumed).

    Raises:
        ValueError: naming the source and both fingerprints, on a mismatch.
    """
    if source is None:
        return
    if theirs.weights == UNTRAINED and not untrained_ok:
        message = (
            f"the receptive tokens of '{source}' are untrained (written by a random-token "
            "run, MODEL.MASKD.ALLOW_RANDOM_TOKENS): no teacher learned them. Give the tokens "
            "of a stage-1 run"
        )
        if not allow_other:
            raise ValueError(message)
        logger.warning("%s (allowed by ALLOW_TOKENS_OF_OTHER_TEACHER)", message)
        return
    if theirs.weights == UNTRAINED:
        return
    if theirs.weights is None:
        logger.warning(
            "the tokens of '%s' carry no teacher fingerprint (a file made by other code, or "
            "edited): cannot verify that they were learned for this teacher",
            source,
        )
        return
    problems = []
    if theirs.weights != ours.weights:
        problems.append(
            f"their teacher fingerprint is {theirs.weights[:16]}..., this teacher's is "
            f"{ours.weights[:16]}... (SHA-256 of the weights)"
        )
    if theirs.config is None:
        logger.warning(
            "the tokens of '%s' carry no fingerprint of their teacher's preprocessing and "
            "backbone settings (a file made by other code, or edited): only the weights are "
            "verified",
            source,
        )
    elif theirs.config != ours.config:
        problems.append(
            f"their teacher's preprocessing and backbone settings (PIXEL_MEAN/STD, INPUT.FORMAT, "
            f"the backbone's config) have the fingerprint {theirs.config[:16]}..., this "
            f"teacher's {ours.config[:16]}..."
        )
    if not problems:
        return
    message = (
        f"the receptive tokens of '{source}' were learned for another teacher: "
        + "; ".join(problems)
        + ". Tokens only make sense on the features of their own teacher: learn them for this "
        "one (stage 1), or set MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER for an experiment"
    )
    if not allow_other:
        raise ValueError(message)
    logger.warning("%s (allowed by ALLOW_TOKENS_OF_OTHER_TEACHER)", message)
