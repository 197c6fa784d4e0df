"""The one place where maskd reaches into private parts of detectron2, fvcore and torch.

Each function names what it relies on; an upstream change breaks here, not across the package.
"""

import contextlib
import os
import zipfile
from typing import Any, Dict
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.registry import Registry
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

__all__ = [
    "IncompatibleKeys",
    "NORM_TYPES",
    "load_state_into",
    "read_checkpoint_file",
    "SafeLoadingCheckpointer",
    "pkl_checkpoint",
    "check_checkpoint_structure",
    "coco_api_of",
    "cpu_ddp_in_default_trainer",
    "register_state_dict_hook",
    "ConfigNameRegistry",
]

# fvcore.common.checkpoint._IncompatibleKeys: what Checkpointer._load_model returns.
IncompatibleKeys = _IncompatibleKeys

# Every torch normalisation layer with running statistics (BatchNorm*, InstanceNorm*, SyncBN).
NORM_TYPES = (nn.modules.batchnorm._NormBase,)


def load_state_into(model: nn.Module, checkpoint: Dict[str, Any]) -> IncompatibleKeys:
    """``DetectionCheckpointer(model)._load_model(checkpoint)``: detectron2's loading of a
    checkpoint dict (its conversions of model-zoo .pkl files, shape checks), without a file."""
    return DetectionCheckpointer(model)._load_model(checkpoint)


class SafeLoadingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose file reading runs no code from the file: ``.pth`` and
    pycls ``.pyth`` files through ``torch.load(..., weights_only=True)`` (explicit, so neither
    an older torch's default nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` changes it), ``.pkl``
    through :func:`pkl_checkpoint`.

    Overrides ``_torch_load`` (what ``DetectionCheckpointer._load_file`` calls for .pth files,
    detectron2 v0.7.2) and the .pkl / .pyth branches of ``_load_file``."""

    def _torch_load(self, f: str) -> Dict[str, Any]:
        _check_archive_size(f)
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        data = self._read_file(filename)
        check_checkpoint_structure(data, filename)
        return data

    def _read_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            return pkl_checkpoint(filename)
        if filename.endswith(".pyth"):  # pycls (RegNet ImageNet models), as detectron2 reads it
            data = self._torch_load(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise ValueError(f"'{filename}': a pycls .pyth checkpoint holds 'model_state'")
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)


# A .pth file (a zip archive) may hold records that inflate to this many times its own size,
# plus this many bytes: torch writes them stored, not compressed; a deflated record of zeros
# inflates a thousandfold, and torch reads it whole before anything could be checked.
_INFLATION_FACTOR, _INFLATION_SLACK = 2, 2**20


def _check_archive_size(path: str) -> None:
    """Fail, naming the file, if a zip-format ``.pth`` declares records that would inflate far
    beyond its own size (read from its central directory, before anything is inflated)."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: storages are read from the file, as large as it is
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:
        total = sum(info.file_size for info in archive.infolist())
    if total > _INFLATION_FACTOR * size + _INFLATION_SLACK:
        raise ValueError(
            f"'{path}' ({size} bytes) holds records that inflate to {total} bytes; torch writes "
            "checkpoints uncompressed, so this is not one: it is refused before it is read"
        )


def check_checkpoint_structure(data: Any, path: str) -> None:
    """Fail, naming the file and the key, where what a weights file holds is not a checkpoint:
    not a dict, a "model" entry that is not a dict of name -> tensor/array (a list, integer
    keys, a string where a tensor belongs), weights that are not dense real numbers (complex,
    string arrays, sparse tensors), or weights that are not finite (NaN/inf: a diverged run's
    file would fail later as a "divergence" of the run that loads it)."""
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds a {type(data).__name__}, not a checkpoint dict")
    state = data.get("model")
    if not isinstance(state, dict):
        raise ValueError(
            f"'{path}': its \"model\" entry is a {type(state).__name__}, not a dict of "
            "weights (name -> tensor)"
        )
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(
            f"'{path}': its weights are named by {type(bad_keys[0]).__name__}s "
            f"({bad_keys[:3]}), not by strings"
        )
    not_arrays, not_finite, not_real = [], [], []
    for key, value in state.items():
        if isinstance(value, (np.ndarray, np.generic)):  # .pkl files: arrays and scalars
            if value.dtype.kind not in "biuf":  # complex, strings: not weights
                not_real.append(f"{key} ({value.dtype})")
                continue
            value = torch.from_numpy(np.asarray(value)) if value.dtype.kind == "f" else None
        elif isinstance(value, complex):
            not_real.append(f"{key} (complex)")
            continue
        elif isinstance(value, float) and not isinstance(value, bool):
            value = torch.tensor(value)
        elif not isinstance(value, (torch.Tensor, int)):
            not_arrays.append(f"{key} ({type(value).__name__})")
            continue
        if isinstance(value, torch.Tensor) and (value.is_complex() or value.is_sparse):
            not_real.append(f"{key} ({'sparse ' if value.is_sparse else ''}{value.dtype})")
            continue
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        if floating and not torch.isfinite(value).all():
            not_finite.append(key)
    if not_arrays:
        raise ValueError(
            f"'{path}': weights that are not tensors: {', '.join(sorted(not_arrays)[:10])}"
        )
    if not_real:
        raise ValueError(
            f"'{path}': weights that are not dense real numbers: "
            f"{', '.join(sorted(not_real)[:10])}; a model's weights are real, and loading would "
            "drop the imaginary part (or fail on a sparse layout) without a word"
        )
    if not_finite:
        raise ValueError(
            f"'{path}': weights with NaN or inf values: {', '.join(sorted(not_finite)[:10])}"
            f"{' ...' if len(not_finite) > 10 else ''}; the run that wrote them diverged, or "
            "the file is damaged"
        )


def read_checkpoint_file(path: str) -> Dict[str, Any]:
    """What ``DetectionCheckpointer.load(path)`` reads before loading: the path manager's local
    copy (``detectron2://`` and URLs), the ``?matching_heuristics=True`` query honoured, and
    ``_load_file`` of :class:`SafeLoadingCheckpointer` (no code from the file)."""
    checkpointer = SafeLoadingCheckpointer(nn.Module())
    parsed = urlparse(path)
    local = checkpointer.path_manager.get_local_path(parsed._replace(query="").geturl())
    checkpointer._parsed_url_during_load = parsed
    try:
        return checkpointer._load_file(local)
    finally:
        checkpointer._parsed_url_during_load = None


def pkl_checkpoint(local: str) -> Dict[str, Any]:
    """A detectron2 or Caffe2 ``.pkl`` checkpoint, read with :func:`maskd.checkpoint.safe_pickle.load_pkl`.

    Copied from the ``.pkl`` branch of ``DetectionCheckpointer._load_file`` (detectron2 v0.7.2),
    changed in one point: the restricted unpickler instead of ``pickle.load``.
    """
    from .checkpoint.safe_pickle import load_pkl

    data = load_pkl(local)
    if not isinstance(data, dict):
        raise ValueError(f"'{local}' holds a {type(data).__name__}, not a checkpoint dict")
    if "model" in data and "__author__" in data:
        return data  # detectron2 model zoo format
    # Caffe2 / Detectron1 model zoo: detection models have "blobs", ImageNet models do not
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


@contextlib.contextmanager
def coco_api_of(data: Dict[str, Any]):
    """Inside this block detectron2's ``load_coco_json`` builds its COCO api from ``data``, an
    annotation file's parsed contents, instead of parsing the file a second time.

    ``load_coco_json`` (detectron2 v0.7.2) imports ``pycocotools.coco.COCO`` when it is called
    and calls ``COCO(json_file)``; inside this block that name is a subclass whose constructor
    takes ``data`` as pycocotools' own constructor takes a file's (``dataset``, then
    ``createIndex``)."""
    import pycocotools.coco

    original = pycocotools.coco.COCO

    class ParsedCOCO(original):
        def __init__(self, annotation_file=None):
            super().__init__()
            self.dataset = data
            self.createIndex()

    pycocotools.coco.COCO = ParsedCOCO
    try:
        yield
    finally:
        pycocotools.coco.COCO = original


@contextlib.contextmanager
def cpu_ddp_in_default_trainer(create_ddp_model):
    """Inside this block, ``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model``
    (the argument) instead of detectron2's ``detectron2.engine.defaults.create_ddp_model``,
    which always passes ``device_ids`` and so fails for CPU models (GLOO processes).
    ``DefaultTrainer.__init__`` looks the function up in its module at call time."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def register_state_dict_hook(module: nn.Module, hook) -> None:
    """``module._register_state_dict_hook(hook)``: ``hook(module, state_dict, prefix,
    local_metadata)`` may rename the keys a module's ``state_dict()`` returns (torch has no
    public form of this hook that may change keys in place)."""
    module._register_state_dict_hook(hook)


class ConfigNameRegistry(Registry):
    """detectron2's ``Registry`` keyed by the name a config uses for what it holds: the class
    attribute ``key`` of each registered class (``NAME`` of a mask source, ``CONFIG_KEY`` of a
    head-level KD term), not the class name. Registration, ``get``, iteration and ``in`` are
    detectron2's; overrides ``Registry._do_register`` (fvcore 0.1.5)."""

    def __init__(self, name: str, key: str):
        super().__init__(name)
        self._key = key

    def _do_register(self, name: str, obj) -> None:
        config_name = getattr(obj, self._key, "")
        if not config_name:
            raise ValueError(f"{obj.__name__} sets no {self._key}: the name configs use for it")
        super()._do_register(config_name, obj)
