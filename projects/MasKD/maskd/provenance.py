"""Which teacher a set of receptive tokens was learned for.

Tokens are meaningful only on the features of the teacher they were learned with. Stage 1 keeps
a fingerprint of its teacher (a SHA-256 of the teacher's weights and buffers) in the model, so
every checkpoint holds it beside the tokens (key :data:`FINGERPRINT_KEY`), and so do token
exports and stage-2 checkpoints. Stage 2 and the tokens export compare it with the teacher at
hand and refuse a mismatch, unless told otherwise (``MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER``).
"""

import hashlib
from typing import Dict, Optional

import torch

__all__ = [
    "FINGERPRINT_KEY",
    "fingerprint",
    "fingerprint_tensor",
    "fingerprint_text",
    "checkpoint_teacher_state",
]

# Top-level key of the fingerprint in stage-1, stage-2 and token-export state dicts.
FINGERPRINT_KEY = "teacher_fingerprint"
# Keys of a teacher's state dict that are not the teacher's (stage 1 keeps its tokens there).
_NOT_TEACHER = ("backbone.tokens.",)


def fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """The hex SHA-256 of a teacher's state dict: every key (but the tokens) in sorted order,
    with its dtype, shape and bytes. Equal for the same weights on any device."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith(_NOT_TEACHER)):
        value = torch.as_tensor(state[key]).detach().cpu().contiguous()
        h.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def fingerprint_tensor(hex_digest: str) -> torch.Tensor:
    """A fingerprint as a (32,) uint8 tensor, to live in state dicts as a buffer."""
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


def fingerprint_text(tensor: Optional[torch.Tensor]) -> Optional[str]:
    """The hex form of a fingerprint buffer; None for None or the all-zero "unknown" value."""
    if tensor is None:
        return None
    data = bytes(torch.as_tensor(tensor).to(torch.uint8).tolist())
    return None if not any(data) else data.hex()


def checkpoint_teacher_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The teacher's part of a MasKD checkpoint's state dict (``teacher.*``, prefix removed;
    ``module.`` of DDP checkpoints too)."""
    out = {}
    for key, value in state.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("teacher."):
            out[key[len("teacher.") :]] = value
    return out
