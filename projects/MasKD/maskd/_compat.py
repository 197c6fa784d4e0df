"""The one place where maskd reaches into private parts of detectron2, fvcore and torch.

Each function names what it relies on; an upstream change breaks here, not across the package.
"""

import contextlib
from typing import Any, Dict
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

__all__ = [
    "IncompatibleKeys",
    "NORM_TYPES",
    "load_state_into",
    "read_checkpoint_file",
    "SafeLoadingCheckpointer",
    "pkl_checkpoint",
    "cpu_ddp_in_default_trainer",
    "register_state_dict_hook",
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
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_file(self, filename: str) -> Dict[str, Any]:
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
    """A detectron2 or Caffe2 ``.pkl`` checkpoint, read with :func:`maskd.safe_pickle.load_pkl`.

    Copied from the ``.pkl`` branch of ``DetectionCheckpointer._load_file`` (detectron2 v0.7.2),
    changed in one point: the restricted unpickler instead of ``pickle.load``.
    """
    from .safe_pickle import load_pkl

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
