"""Transparent wrappers, and the recording through which a wrapper hands on what its forward
made.

A :class:`TransparentWrapper` wraps a module of a detectron2 model in place (a backbone, a head,
a box predictor), so that the model's own ``forward`` runs unchanged, without forward hooks. It
is transparent in state dicts: the wrapped module's parameters keep the keys they have without
the wrapper, so plain detectron2 checkpoints load into a wrapped model and back.

What a wrapper's forward made is kept only inside a :func:`recording` block opened by the caller
(one training step) and read in that block with :meth:`TransparentWrapper.recorded`: nothing
outlives the step that made it, and a forward nobody records (inference, visualisation) keeps
nothing.
"""

import contextlib
from typing import Any, Dict, Iterator, List, Optional

from torch import nn

from .._compat import register_state_dict_hook

__all__ = ["TransparentWrapper", "TransparentModule", "recording"]

_INNER = "inner"


class TransparentWrapper:
    """Mixin for a module that wraps another as ``self.inner``: that level is hidden in
    state-dict keys (saving and loading), and attributes it lacks are read from the inner
    module, so code that used the wrapped module keeps working.

    A wrapper's forward hands what it made to an open :func:`recording` with :meth:`keep`;
    the caller reads it with :meth:`recorded` inside that block.
    """

    def _wrap(self, inner: nn.Module) -> None:
        if isinstance(inner, TransparentWrapper):
            raise ValueError(f"{type(inner).__name__} is already wrapped")
        self.inner = inner
        self._record: Optional[Dict[str, Any]] = None  # open only inside recording()
        register_state_dict_hook(self, _hide_inner)
        self.register_load_state_dict_pre_hook(_expand_inner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if _INNER in modules and name != _INNER:
                return getattr(modules[_INNER], name)
            raise

    def own_keys(self) -> List[str]:
        """Names of this wrapper's own children (not the wrapped module's)."""
        return [name for name, _ in self.named_children() if name != _INNER]

    def keep(self, **values: Any) -> None:
        """Called by the forward: keep ``values`` for the open recording (none open: dropped)."""
        if self._record is not None:
            self._record.update(values)

    def recorded(self, key: str) -> Any:
        """What the forwards of the open recording kept under ``key``.

        Raises:
            RuntimeError: no recording is open, or no forward inside it kept ``key``.
        """
        if self._record is None:
            raise RuntimeError(
                f"{type(self).__name__}.recorded('{key}') outside a recording() block"
            )
        if key not in self._record:
            raise RuntimeError(
                f"{type(self).__name__}: no '{key}' was made in this step (the model's forward "
                f"did not call its {type(self.inner).__name__} in training mode)"
            )
        return self._record[key]


class TransparentModule(TransparentWrapper, nn.Module):
    """A transparent wrapper of any module (a head, a box predictor): subclass it and write the
    forward, which calls ``self.inner`` and :meth:`keep` what the step needs."""

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)
        self._wrap(inner)


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[None]:
    """Open a recording on every :class:`TransparentWrapper` inside ``model`` (``model``
    included): inside the block, their forwards keep what they make (:meth:`keep`) and
    :meth:`TransparentWrapper.recorded` reads it; on leaving it everything kept is dropped.

    Raises:
        RuntimeError: a recording is already open on one of them (nested steps).
    """
    wrappers = [m for m in model.modules() if isinstance(m, TransparentWrapper)]
    busy = [type(m).__name__ for m in wrappers if m._record is not None]
    if busy:
        raise RuntimeError(f"a recording is already open on {busy}")
    try:
        for m in wrappers:
            m._record = {}
        yield
    finally:
        for m in wrappers:
            m._record = None


def _hide_inner(module, state_dict, prefix, local_metadata):
    """state_dict hook: ``<prefix>inner.<key>`` -> ``<prefix><key>``."""
    inner_prefix = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(inner_prefix)]:
        state_dict[prefix + key[len(inner_prefix) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions, keyed by module prefix without the final dot
        metadata.pop(prefix + _INNER, None)  # the wrapper's own entry stands for it
        for key in [k for k in metadata if k.startswith(inner_prefix)]:
            metadata[prefix + key[len(inner_prefix) :]] = metadata.pop(key)


def _expand_inner(module, state_dict, prefix, *args):
    own = tuple(prefix + name + "." for name in module.own_keys())
    inner_prefix = prefix + _INNER + "."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(own) and not key.startswith(inner_prefix):
            state_dict[inner_prefix + key[len(prefix) :]] = state_dict.pop(key)
