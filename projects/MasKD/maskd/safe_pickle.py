"""Reading detectron2 ``.pkl`` checkpoints without running code from them.

detectron2's model zoo (and Caffe2 / Detectron1 ImageNet models) ship weights as pickles, and
``pickle.load`` executes whatever a crafted file asks for. :func:`load_pkl` unpickles with an
allow-list: containers, strings and numbers are built in by pickle itself; the only globals a
file may name are numpy's array and dtype reconstructors (and ``collections.OrderedDict``).
Anything else is refused with an error naming the file and the global, before it is called.

Arbitrary pickles (e.g. a file of your own that holds other Python objects) load only when the
environment variable ``MASKD_ALLOW_UNSAFE_PICKLE=1`` is set, for every process of the run: it
means trusting the file as you would trust code.
"""

import logging
import os
import pickle
from typing import Any

__all__ = ["load_pkl", "UnsafePickleError", "UNSAFE_PICKLE_ENV"]

logger = logging.getLogger(__name__)

UNSAFE_PICKLE_ENV = "MASKD_ALLOW_UNSAFE_PICKLE"

# (module, name) pairs that model-zoo pickles contain: numpy arrays, their dtypes and scalars.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"'{self.path}' asks to load the Python global '{module}.{name}', which a weights "
            "file does not need (model-zoo pickles hold only dicts, strings, numbers and numpy "
            "arrays); refused, nothing of it was run. If you trust this file as you would trust "
            f"code, set {UNSAFE_PICKLE_ENV}=1"
        )


def unsafe_pickle_allowed() -> bool:
    """Whether the opt-in to arbitrary pickles is set."""
    return os.environ.get(UNSAFE_PICKLE_ENV, "") == "1"


def load_pkl(path: str, file=None) -> Any:
    """Unpickle a weights file with the allow-list (latin1 strings, as detectron2 reads them).

    Args:
        path: the local file (also named in errors).
        file: an open binary file of it, if already open.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list (unless the opt-in
            is set).
    """
    if file is None:
        with open(path, "rb") as f:
            return load_pkl(path, f)
    if unsafe_pickle_allowed():
        logger.warning("%s=1: unpickling '%s' without restrictions", UNSAFE_PICKLE_ENV, path)
        return pickle.load(file, encoding="latin1")
    return _RestrictedUnpickler(file, path).load()
