"""Receptive tokens from checkpoint files: stage-1 and stage-2 checkpoints and tokens exports,
with the fingerprints of the teacher they were learned for."""

import logging
import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..modeling.receptive_tokens import FORM_KEY, MASK_NORMS, ReceptiveTokens, paper_form
from .format import (
    STAGE1,
    STAGE2,
    TOKEN_PREFIXES,
    bare_state,
    checkpoint_kind,
    print_at,
    read_checkpoint,
)
from .provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    TOKENS_CONFIG_KEY,
    TOKENS_KEY,
    TeacherPrint,
    checkpoint_teacher_state,
    fingerprint,
)

__all__ = ["extract_tokens_state", "load_tokens", "tokens_teacher_print", "tokens_from_file"]

logger = logging.getLogger(__name__)


def extract_tokens_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The receptive-token weights of a MasKD checkpoint, keyed ``<level>.<param>``; a level
    saved without its ``form`` (tokens of the paper's form, from files that predate it) gets
    the paper's.

    Returns an empty dict if the checkpoint holds none.
    """
    for prefix in TOKEN_PREFIXES:
        found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if found:
            for level in {k.split(".", 1)[0] for k in found}:
                found.setdefault(f"{level}.{FORM_KEY}", paper_form())
            return found
    return {}


def _form_of(value, level: str, path: str, what: str):
    """(mask_norm, weight_floor) of a level's ``form`` tensor in a file."""
    form = torch.as_tensor(value)
    if form.shape != (2,) or form.dtype != torch.int64:
        raise ValueError(f"{what}: '{path}': '{level}.{FORM_KEY}' is not a form of tokens")
    code, floor = form.tolist()
    if not 0 <= code < len(MASK_NORMS) or not 0 <= floor < 1_000_000:
        raise ValueError(f"{what}: '{path}': '{level}.{FORM_KEY}' = {form.tolist()} is unknown")
    return MASK_NORMS[code], floor / 1_000_000


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
    # where they come from, for the provenance check of stage 2 (maskd.checkpoint.provenance)
    tokens.source = path
    tokens.teacher_print = teacher
    logger.info("Loaded receptive tokens for levels %s from %s", levels_file, path)


def tokens_teacher_print(
    state: Dict[str, Any], path: str, what: str = "checkpoint"
) -> TeacherPrint:
    """The fingerprints of the teacher that the receptive tokens of a checkpoint were learned
    for (:mod:`maskd.checkpoint.provenance`): a stage-1 checkpoint's own teacher (checked against the
    teacher weights the file holds), a tokens export's record, a stage-2 checkpoint's record of
    its tokens' teacher (not its own teacher's).

    Args:
        state: the checkpoint's "model" entry.
        path, what: the file and the key naming it, for messages.

    Raises:
        ValueError: a stage-1 checkpoint whose teacher weights are not those its fingerprint
            records (altered, or assembled from two runs).
    """
    state = bare_state(state)
    kind = checkpoint_kind(list(state))
    if kind == STAGE2:
        return print_at(state, TOKENS_KEY, TOKENS_CONFIG_KEY)
    recorded = print_at(state, FINGERPRINT_KEY, CONFIG_KEY)
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
    mask_norm: Optional[str] = None,
    weight_floor: Optional[float] = None,
) -> nn.ModuleDict:
    """Build the learned receptive tokens of a checkpoint, their levels, shapes and form read
    from it (a LazyConfig-callable builder for :class:`maskd.MasKD`'s ``tokens``).

    Args:
        weights: a stage-1 checkpoint, stage-2 checkpoint or tokens export.
        num_tokens, weighted, mask_norm, weight_floor: if given, what the file must hold
            (else anything).
        what: the config key naming the file, for messages.

    Returns:
        level -> loaded ReceptiveTokens (T, C from the file; weighted if the file has
        ``weight_head`` tensors; the file's mask normalisation and weight floor), frozen.
    """
    checkpoint = read_checkpoint(weights, what=what)
    state = extract_tokens_state(checkpoint.get("model", {}))
    if not state:
        raise ValueError(f"{what}: '{weights}' holds no receptive tokens")
    channels, counts, heads, forms = {}, {}, {}, {}
    for key, value in state.items():
        level, name = key.split(".", 1)
        if name == "tokens":
            counts[level], channels[level] = tuple(value.shape)
        elif name == FORM_KEY:
            forms[level] = _form_of(value, level, weights, what)
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
        norm, floor = forms[level]
        asked = (mask_norm or norm, floor if weight_floor is None else weight_floor)
        if norm != asked[0] or not math.isclose(floor, asked[1], abs_tol=1e-6):
            raise ValueError(
                f"{what}: the tokens of '{weights}' on level '{level}' have mask_norm={norm}, "
                f"weight_floor={floor}; mask_norm={asked[0]}, weight_floor={asked[1]} was asked "
                "for (MODEL.MASKD.MASK_NORM, MODEL.MASKD.WEIGHT_FLOOR must be those of stage 1)"
            )
    tokens = nn.ModuleDict(
        {lv: ReceptiveTokens(channels[lv], counts[lv], heads[lv], *forms[lv]) for lv in channels}
    )
    load_tokens(tokens, weights, what, checkpoint)  # the file is read once
    return tokens.requires_grad_(False).eval()
