"""Extending MasKD from outside the package: ``--import MODULE`` on the command lines imports a
user's module before the config is made, so that what it registers (a head-level KD term, a mask
source, a backbone, a meta-architecture) exists when the config and the model are built."""

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import List, Sequence

__all__ = ["import_modules", "add_import_argument", "registered_after_the_config"]

logger = logging.getLogger(__name__)


def import_modules(names: Sequence[str], what: str = "--import") -> List[ModuleType]:
    """Import each of ``names``: a module name on the Python path (``my_project.kd_terms``) or
    the path of a ``.py`` file. Importing twice is a no-op, so every process of a run (and
    every stage of a pipeline) may import the same modules.

    Raises:
        FileNotFoundError, ModuleNotFoundError: naming ``what`` and the module.
    """
    modules = []
    for name in names:
        if name.endswith(".py") or os.sep in name:
            modules.append(_import_file(name, what))
            continue
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name and name.split(".")[0] == e.name.split(".")[0]:
                raise ModuleNotFoundError(
                    f"{what} {name}: no module named '{e.name}' on the Python path: add its "
                    "folder to PYTHONPATH, or give the path of its .py file"
                ) from None
            raise
        logger.info("%s: imported %s", what, name)
    return modules


def _import_file(path: str, what: str) -> ModuleType:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"maskd_user_{stem}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    logger.info("%s: imported %s", what, path)
    return module


def add_import_argument(parser, help_text: str = "") -> None:
    """Add ``--import MODULE`` (repeatable, into ``args.imports``) to an argparse parser."""
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help=help_text
        or "import a module of your own (a name on the Python path, or a .py file) before the "
        "config is made, so that the head-level KD terms, mask sources, backbones or "
        "meta-architectures it registers can be used (repeatable)",
    )


def registered_after_the_config(problem: str) -> KeyError:
    """The error for a term, mask source or key of a user's module that the config lacks because
    the module was imported after the config was made; ``problem`` says what is missing."""
    return KeyError(
        f"{problem}: the module that registers it was imported after the config was made. "
        "Import it before (train_net.py, distill_net.py, tools/export.py: --import MODULE; in "
        "Python: before get_maskd_cfg() or add_maskd_config())"
    )
