"""Model-zoo style release of MasKD results.

* :func:`export_student`: a stage-2 checkpoint -> the student's weights alone, with the keys
  plain detectron2 expects, plus the student's own config beside it, so that vanilla detectron2
  (no ``maskd`` import) evaluates it with ``--eval-only MODEL.WEIGHTS student.pth``.
* :func:`export_tokens`: a stage-1 checkpoint -> the receptive tokens alone, for
  ``MODEL.MASKD.TOKENS_WEIGHTS``.

Files are written atomically (a temporary file renamed into place) and never overwrite an
existing file unless asked.
"""

import copy
import logging
import os
from typing import Dict, Optional

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

from ..config import local_config_files
from ..modeling.meta_arch.maskd import student_config as stage2_student_config
from ..projects.deeplab import add_deeplab_config, is_deeplab
from ..utils.files import atomic_write, write_text
from .format import bare_state, read_checkpoint, short_list
from .provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    STUDENT_PREPROCESSING_KEY,
    check_student_preprocessing,
    fingerprint_tensor,
    student_preprocessing,
)
from .tokens import extract_tokens_state, tokens_teacher_print

__all__ = ["export_student", "export_tokens", "release_config", "check_student_fits"]

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


def _model_state(checkpoint_path: str) -> Dict[str, torch.Tensor]:
    return read_checkpoint(checkpoint_path)["model"]


def release_config(cfg, weights: str):
    """The student's own config from a stage-2 config (yacs CfgNode or LazyConfig).

    yacs: ``MODEL.META_ARCHITECTURE`` becomes ``MODEL.MASKD.STUDENT_META_ARCHITECTURE`` and every
    key plain detectron2 does not know is dropped (``MODEL.MASKD``, ``SOLVER.OPTIMIZER``, and the
    DeepLab project's keys unless the student is a DeepLab model, whose config then loads as the
    DeepLab project's own do: ``add_deeplab_config(get_cfg())``), so ``get_cfg()`` reads it.
    LazyConfig: ``model`` becomes ``model.student``. Either way the weights point at the exported
    file.
    """
    if isinstance(cfg, CfgNode):
        out = stage2_student_config(cfg)
        reference = get_cfg()
        if is_deeplab(out):
            add_deeplab_config(reference)
        _keep_known_keys(out, reference)
        out.MODEL.WEIGHTS = weights
        return CfgNode(out)  # a plain detectron2 CfgNode
    out = copy.deepcopy(cfg)
    out.model = cfg.model.student
    out.train.init_checkpoint = weights
    return out


def _keep_known_keys(node: CfgNode, reference: CfgNode) -> None:
    """Delete, in place, the keys of ``node`` that ``reference`` lacks (recursively)."""
    for key in list(node.keys()):
        if key not in reference:
            del node[key]
        elif isinstance(node[key], CfgNode) and isinstance(reference[key], CfgNode):
            _keep_known_keys(node[key], reference[key])


def _refuse_overwriting_inputs(outputs, inputs) -> None:
    """Fail if an output is one of the (existing) input files, whatever the path says."""
    for out in outputs:
        for what, path in inputs:
            if (
                path
                and os.path.exists(out)
                and os.path.exists(path)
                and os.path.samefile(out, path)
            ):
                raise ValueError(
                    f"the export would write '{out}', which is the {what} it reads: choose "
                    "another --output (--force never replaces an input)"
                )


def check_student_fits(
    out_cfg,
    student: Dict[str, torch.Tensor],
    checkpoint_path: str,
    preprocessing: Optional[torch.Tensor] = None,
) -> None:
    """Fail, naming the keys, if the student that ``out_cfg`` (the student's own config) builds
    does not have exactly the weights of ``student`` (the same names and shapes), or, where
    ``preprocessing`` (the stage-2 checkpoint's record of the student's ``PIXEL_MEAN`` and
    ``PIXEL_STD``, (2C,)) is given, other preprocessing.

    Raises:
        ValueError: the config describes another model than the checkpoint's student.
    """
    if isinstance(out_cfg, CfgNode):
        cfg = out_cfg.clone()
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
    else:
        model = instantiate(copy.deepcopy(out_cfg.model))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(torch.as_tensor(v).shape) for k, v in student.items()}
    problems = [f"{k} missing from the checkpoint" for k in sorted(set(expected) - set(got))]
    problems += [f"{k} not in the config's model" for k in sorted(set(got) - set(expected))]
    problems += [
        f"{k}: checkpoint {got[k]}, config {expected[k]}"
        for k in sorted(set(got) & set(expected))
        if got[k] != expected[k]
    ]

    if not problems:
        check_student_preprocessing(
            preprocessing, student_preprocessing(model), f"'{checkpoint_path}'"
        )
    if problems:
        raise ValueError(
            f"the config does not describe the student of '{checkpoint_path}': "
            f"{short_list(problems)}. Give "
            "the stage-2 config (and overrides) the checkpoint was trained with"
        )


def export_student(
    checkpoint_path: str,
    output_path: str,
    cfg=None,
    overwrite: bool = False,
    config_file: str = "",
) -> Dict[str, torch.Tensor]:
    """Write the student's weights of a stage-2 checkpoint as a plain detectron2 checkpoint.

    Args:
        checkpoint_path: a stage-2 checkpoint (keys ``student.*``, ``teacher.*``, ...).
        output_path: where to write the .pth file.
        cfg: the stage-2 config; if given, the student's config is written beside the weights
            (``<output>.yaml``), after checking that it builds the checkpoint's student.
        overwrite: replace existing files (never the checkpoint or the config file read).
        config_file: the file ``cfg`` was read from, so that it is never overwritten.

    Returns:
        the exported state dict.
    """
    state = _model_state(checkpoint_path)
    student = {
        k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)
    }
    if not student:
        raise ValueError(
            f"'{checkpoint_path}' holds no student weights (keys 'student.*'): "
            "is it a stage-2 (MasKD) checkpoint?"
        )
    config_path = os.path.splitext(output_path)[0] + ".yaml"
    if os.path.abspath(config_path) == os.path.abspath(output_path):
        raise ValueError(
            f"--output '{output_path}' ends in .yaml, where the student's config goes: name the "
            "weights file with .pth"
        )
    configs = local_config_files(config_file) if config_file else []
    _refuse_overwriting_inputs(
        [output_path, config_path] if cfg is not None else [output_path],
        [("checkpoint", checkpoint_path)]
        + [("config file" if i == 0 else "config's _BASE_", f) for i, f in enumerate(configs)],
    )
    if os.path.exists(output_path) and not overwrite:
        raise FileExistsError(f"'{output_path}' exists; pass --force to replace it")
    if cfg is not None and os.path.exists(config_path) and not overwrite:
        raise FileExistsError(f"'{config_path}' exists; pass --force to replace it")
    # The config first, the weights last: a release whose weights file exists is complete.
    if cfg is not None:
        out_cfg = release_config(cfg, os.path.abspath(output_path))
        recorded = bare_state(state).get(STUDENT_PREPROCESSING_KEY)
        check_student_fits(out_cfg, student, checkpoint_path, recorded)
        if isinstance(out_cfg, CfgNode):
            atomic_write(config_path, lambda tmp: write_text(tmp, out_cfg.dump()), True)
        else:
            atomic_write(config_path, lambda tmp: LazyConfig.save(out_cfg, tmp), True)
        logger.info("Wrote the student's config to %s", config_path)
    atomic_write(
        output_path,
        lambda tmp: torch.save({"model": student, "__author__": "MasKD export"}, tmp),
        True,
    )
    logger.info("Wrote %d student tensors to %s", len(student), output_path)
    return student


def export_tokens(
    checkpoint_path: str, output_path: str, overwrite: bool = False
) -> Dict[str, torch.Tensor]:
    """Write the receptive tokens of a stage-1 (or stage-2) checkpoint alone.

    The file holds ``{"model": {"tokens.<level>.<param>": tensor, "teacher_fingerprint": ...,
    "teacher_config_fingerprint": ...}}``, which ``MODEL.MASKD.TOKENS_WEIGHTS`` accepts; the
    fingerprints of the teacher the tokens were learned for (:mod:`maskd.checkpoint.provenance`) are kept,
    a stage-1 checkpoint's checked against the teacher it holds.
    """
    _refuse_overwriting_inputs([output_path], [("checkpoint", checkpoint_path)])
    model_state = _model_state(checkpoint_path)
    tokens = extract_tokens_state(model_state)
    if not tokens:
        raise ValueError(f"'{checkpoint_path}' holds no receptive tokens")
    state = {f"tokens.{k}": v for k, v in tokens.items()}
    # provenance: the fingerprints of the teacher the tokens were learned for go with them (a
    # stage-1 checkpoint's are checked against its own teacher; a stage-2 checkpoint's are its
    # record of its tokens' teacher, not its own teacher's)
    recorded = tokens_teacher_print(model_state, checkpoint_path, "checkpoint")
    if recorded.weights is None:
        logger.warning("'%s' records no teacher fingerprint: the export has none", checkpoint_path)
    else:
        state[FINGERPRINT_KEY] = fingerprint_tensor(recorded.weights)
    if recorded.config is not None:
        state[CONFIG_KEY] = fingerprint_tensor(recorded.config)
    atomic_write(output_path, lambda tmp: torch.save({"model": state}, tmp), overwrite)
    logger.info("Wrote %d token tensors to %s", len(state), output_path)
    return state
