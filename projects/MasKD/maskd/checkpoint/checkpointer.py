"""Per-submodule weight loading and atomic saving for MasKD models: :class:`MasKDCheckpointer`."""

import os
from typing import Any, Dict

import torch
from torch import nn

from .._compat import SafeLoadingCheckpointer
from ..utils.files import (
    atomic_write,
    open_regular,
    read_small_text,
    remove_stale_temporaries,
    write_text,
)
from .format import check_local_file, short_list
from .loading import load_checkpoint_dict
from .safe_pickle import UnsafePickleError

__all__ = ["MasKDCheckpointer"]


class MasKDCheckpointer(SafeLoadingCheckpointer):
    """A DetectionCheckpointer that reads files without running code from them
    (:class:`~maskd._compat.SafeLoadingCheckpointer`), loads weights into the submodule they
    are meant for (:func:`load_checkpoint_dict`) and saves atomically.

    For plain detectron2 models and plain checkpoints it is DetectionCheckpointer. A
    checkpointer that saves (the main process) removes, when it is made, the temporary files
    that a killed run left in its folder.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        if self.save_dir and self.save_to_disk:
            remove_stale_temporaries(self.save_dir)

    _resuming = False

    def _load_model(self, checkpoint):
        incompatible = load_checkpoint_dict(self.model, checkpoint)
        if self._resuming and incompatible.incorrect_shapes:
            # detectron2 skips weights of other shapes (fine-tuning to other classes); a resumed
            # run whose model changed would fail later, in the optimizer, with a raw size error
            shapes = [f"{k} (file {a}, model {b})" for k, a, b in incompatible.incorrect_shapes]
            raise ValueError(
                f"the checkpoint was written by another model: shape mismatches "
                f"{short_list(shapes)}. Resume with the config of the run that wrote it, or "
                "start a new run in another folder"
            )
        return incompatible

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """``Checkpointer.resume_or_load``, its errors naming the file and what named it (the
        last checkpoint of ``--resume``, or ``MODEL.WEIGHTS`` / ``train.init_checkpoint``)."""
        if resume and self.has_checkpoint():
            what, path = "--resume (last_checkpoint)", self.get_checkpoint_file()
            tag = os.path.join(self.save_dir, "last_checkpoint")
            planted = os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path))
            if planted:  # written by the run: a regular file, never a link, FIFO or device
                os.close(open_regular(path, os.O_RDONLY, f"--resume ('{tag}' names it)"))
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--resume: '{tag}' names '{os.path.basename(path)}', which is not a "
                    f"checkpoint file in {self.save_dir} (empty or edited?): write the name of "
                    "the checkpoint to resume from into it, or remove it to start afresh"
                )
        else:
            what = "MODEL.WEIGHTS (train.init_checkpoint)"
        if path:  # empty: detectron2 starts from the initialisation
            check_local_file(path, what)
        self._resuming = what.startswith("--resume")
        try:
            return super().resume_or_load(path, resume=resume)
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{what}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{what}: '{path}': {e}") from None
        except Exception as e:  # a damaged file, a model that is not the checkpoint's
            raise RuntimeError(
                f"{what}: could not load '{path}': {type(e).__name__}: {e}. Is the file "
                "complete, and does the config describe the model that wrote it?"
            ) from e
        finally:
            self._resuming = False

    def get_checkpoint_file(self) -> str:
        """``Checkpointer.get_checkpoint_file`` (fvcore 0.1.5): the checkpoint that
        ``last_checkpoint`` names, or "" without one; a local ``last_checkpoint`` is read as a
        small regular file (:func:`read_small_text`: a link, a FIFO, a device or a file of more
        than 4 KB is refused, naming it)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not os.path.lexists(tag):
            return super().get_checkpoint_file()  # not local, or none: fvcore's
        name = read_small_text(tag, 4096, "--resume (last_checkpoint)").strip()
        return os.path.join(self.save_dir, name)

    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``, but atomic: a killed job never leaves a truncated
        checkpoint, and ``last_checkpoint`` only ever names a complete file.

        Copied from ``fvcore.common.checkpoint.Checkpointer.save`` (fvcore 0.1.5), changed in
        one point: the file is written by :func:`atomic_write`."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda tmp: torch.save(data, tmp), overwrite=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """``Checkpointer.tag_last_checkpoint`` (fvcore 0.1.5), written atomically."""
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda tmp: write_text(tmp, last_filename_basename),
            overwrite=True,
        )
