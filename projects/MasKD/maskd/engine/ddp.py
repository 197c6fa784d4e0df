"""DistributedDataParallel for MasKD models, GPU and CPU (GLOO) processes alike."""

import torch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model", "unwrap"]


def create_ddp_model(
    model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs
) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when there are several processes.

    Copied from ``detectron2.engine.defaults.create_ddp_model`` (detectron2 v0.7.2), changed
    in one point: for a CPU model (GLOO processes) it passes no ``device_ids``, which
    DistributedDataParallel rejects for CPU modules. Frozen parameters (teacher, tokens in stage 2) have ``requires_grad=False`` and are
    not synchronised as trainable; keep ``find_unused_parameters`` off: every trainable
    parameter gets a gradient in every step.
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cpu":
        kwargs.pop("device_ids", None)
    elif "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
