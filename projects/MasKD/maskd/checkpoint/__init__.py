"""MasKD checkpoints: reading any file detectron2 reads without running code from it
(:mod:`.safe_pickle`, :mod:`.format`), routing weights to the submodule they are meant for
(:mod:`.loading`, :class:`MasKDCheckpointer`), receptive-token files (:mod:`.tokens`), the
teacher fingerprints that bind tokens to their teacher (:mod:`.provenance`), and the
model-zoo style release of results (:mod:`.export`)."""

from .checkpointer import MasKDCheckpointer
from .format import TOKEN_PREFIXES, checkpoint_kind, read_checkpoint
from .loading import load_checkpoint_dict, load_weights_strict
from .tokens import extract_tokens_state, load_tokens, tokens_from_file, tokens_teacher_print

__all__ = [
    "MasKDCheckpointer",
    "read_checkpoint",
    "checkpoint_kind",
    "TOKEN_PREFIXES",
    "load_checkpoint_dict",
    "load_weights_strict",
    "load_tokens",
    "tokens_from_file",
    "tokens_teacher_print",
    "extract_tokens_state",
]
