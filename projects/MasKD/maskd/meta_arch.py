"""Stage 2: masked distillation of a student from a frozen teacher through frozen tokens."""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from .backbone import RecordingBackbone
from .checkpoint import load_tokens
from .diagnostics import level_sizes, put_token_statistics, token_statistics
from .heads import (
    RecordingBoxPredictor,
    RecordingDenseHead,
    dense_regression_kd_loss,
    inherit_neck_and_heads,
    roi_regression_kd_loss,
)
from .losses import masked_distillation_loss, raise_if_not_finite
from .receptive_tokens import build_level_tokens
from .teacher import build_teacher, freeze, head_levels, prepare_teacher, preprocess_images
from .token_learner import resolve_in_features

__all__ = ["MasKD"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MasKD(nn.Module):
    """Stage 2 of MasKD: a student distilled from a frozen teacher under receptive masks.

    Training returns the student's ordinary loss dict plus ``loss_maskd``: for every distilled
    level, the student's features go through a trainable 1x1 ``align`` conv (student channels
    -> teacher channels) and are pulled towards the teacher's under the frozen tokens' masks
    (see :func:`maskd.losses.masked_distillation_loss`); the levels are summed and multiplied
    by ``loss_weight``. After ``custom_mask_warmup`` iterations (read from the event storage,
    so it survives a resume) the teacher's masks are multiplied by the masks of the aligned
    student features ("student-customised masks"). Only the teacher's backbone runs, under
    ``torch.no_grad()``; its heads never run. Inference returns exactly the student's outputs.

    Attributes:
        student: the student meta-architecture (its ``backbone`` is a transparent
            :class:`RecordingBackbone`).
        teacher: the frozen teacher meta-architecture, always in eval mode.
        tokens: level name -> frozen ReceptiveTokens.
        align: level name -> trainable 1x1 Conv2d.
    """

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        in_features: Optional[List[str]] = None,
        num_tokens: int = 6,
        weighted: bool = True,
        loss_weight: float = 1.0,
        custom_mask_warmup: int = -1,
        teacher_weights: str = "",
        tokens_weights: str = "",
        allow_random_teacher: bool = False,
        allow_random_tokens: bool = False,
        roi_reg_kd_weight: float = 0.0,
        roi_reg_kd_beta: float = 1.0,
        dense_reg_kd_weight: float = 0.0,
        dense_reg_kd_loss: str = "l1",
        dense_reg_kd_beta: float = 1.0,
        inherit: bool = False,
    ):
        """
        Args:
            student: a detectron2 meta-architecture with a ``backbone``.
            teacher: a detectron2 meta-architecture with a ``backbone``, built but not loaded;
                it may be of another kind than the student.
            in_features: distilled levels; None or empty: every level the student's backbone
                produces and the teacher's heads read (the levels stage 1 learns tokens for).
            num_tokens: tokens per level (must match the stage-1 checkpoint).
            weighted: whether the tokens have mask-weight heads (must match too).
            loss_weight: weight of ``loss_maskd``.
            custom_mask_warmup: iteration from which student-customised masks are used;
                negative: never.
            teacher_weights: the teacher's checkpoint, loaded here.
            tokens_weights: the learned tokens (stage-1 checkpoint or tokens export), loaded here.
            allow_random_teacher: accept an empty ``teacher_weights`` (smoke tests only).
            allow_random_tokens: accept an empty ``tokens_weights`` (an ablation).
            roi_reg_kd_weight: weight of ``loss_roi_reg_kd`` (R-CNN student and teacher); 0: off.
            roi_reg_kd_beta: its SmoothL1 beta.
            dense_reg_kd_weight: weight of ``loss_dense_reg_kd`` (RetinaNet/FCOS student and a
                teacher with the same head layout); 0: off.
            dense_reg_kd_loss: "l1" or "smooth_l1"; dense_reg_kd_beta: its beta.
            inherit: copy the teacher's neck and head weights into the student where names and
                shapes match, when the model is built.
        """
        super().__init__()
        prepare_teacher(
            teacher, teacher_weights, allow_random_teacher, "MODEL.MASKD.TEACHER.WEIGHTS"
        )
        t_shapes = teacher.backbone.output_shape()
        s_shapes = student.backbone.output_shape()
        levels = resolve_in_features(
            in_features, {"student": list(s_shapes), "teacher": head_levels(teacher)}
        )
        s_format = getattr(student, "input_format", None)
        t_format = getattr(teacher, "input_format", None)
        if s_format and t_format and s_format != t_format:
            raise ValueError(
                f"the student reads {s_format} images but the teacher {t_format}: both see the "
                "same input tensors, so they must use the same INPUT.FORMAT"
            )
        for lv in levels:
            if s_shapes[lv].stride != t_shapes[lv].stride:
                raise ValueError(
                    f"level '{lv}' has stride {s_shapes[lv].stride} in the student and "
                    f"{t_shapes[lv].stride} in the teacher: its features cannot be aligned"
                )
        self.inherited: List[str] = []
        if inherit:
            self.inherited, _ = inherit_neck_and_heads(student, teacher)
        self.roi_reg_kd_weight, self.roi_reg_kd_beta = roi_reg_kd_weight, roi_reg_kd_beta
        if roi_reg_kd_weight > 0:
            _check_roi_kd(student, teacher)
            student.roi_heads.box_predictor = RecordingBoxPredictor(student.roi_heads.box_predictor)
        self.dense_reg_kd_weight = dense_reg_kd_weight
        self.dense_reg_kd_loss, self.dense_reg_kd_beta = dense_reg_kd_loss, dense_reg_kd_beta
        if dense_reg_kd_weight > 0:
            _check_dense_kd(student, teacher)
            student.head = RecordingDenseHead(student.head)
        student.backbone = RecordingBackbone(student.backbone)
        self.student = student
        self.teacher = teacher
        self.tokens = build_level_tokens(
            {lv: t_shapes[lv].channels for lv in levels}, num_tokens, weighted
        )
        if tokens_weights:
            load_tokens(self.tokens, tokens_weights)
        elif allow_random_tokens:
            logger.warning("MODEL.MASKD.TOKENS_WEIGHTS is empty: distilling with random tokens")
        else:
            raise ValueError(
                "MODEL.MASKD.TOKENS_WEIGHTS is empty: stage 2 needs the receptive tokens learned "
                "in stage 1 (its model_final.pth, or a tokens export); set "
                "MODEL.MASKD.ALLOW_RANDOM_TOKENS only for the random-token ablation"
            )
        freeze(self.tokens)
        self.align = nn.ModuleDict(
            {
                lv: nn.Conv2d(s_shapes[lv].channels, t_shapes[lv].channels, kernel_size=1)
                for lv in levels
            }
        ).to(self.tokens[levels[0]].tokens.device)
        self.in_features = levels
        self.loss_weight = loss_weight
        self.custom_mask_warmup = custom_mask_warmup
        logger.info(
            "MasKD: levels %s, %d tokens (weighted=%s), loss weight %s, customised masks from "
            "iteration %s",
            levels,
            num_tokens,
            weighted,
            loss_weight,
            custom_mask_warmup if custom_mask_warmup >= 0 else "never",
        )

    @classmethod
    def from_config(cls, cfg):
        mcfg = cfg.MODEL.MASKD
        if mcfg.STUDENT_META_ARCHITECTURE in ("MasKD", "MasKDTokenLearner"):
            raise ValueError(
                "MODEL.MASKD.STUDENT_META_ARCHITECTURE must name the student's own "
                f"meta-architecture, got '{mcfg.STUDENT_META_ARCHITECTURE}'"
            )
        student_cfg = cfg.clone()
        student_cfg.defrost()
        student_cfg.MODEL.META_ARCHITECTURE = mcfg.STUDENT_META_ARCHITECTURE
        return {
            "student": build_model(student_cfg),
            "teacher": build_teacher(mcfg.TEACHER.CONFIG_FILE, mcfg.TEACHER.OPTS, cfg.MODEL.DEVICE),
            "in_features": list(mcfg.IN_FEATURES),
            "num_tokens": mcfg.NUM_TOKENS,
            "weighted": mcfg.WEIGHTED,
            "loss_weight": mcfg.LOSS_WEIGHT,
            "custom_mask_warmup": mcfg.CUSTOM_MASK_WARMUP,
            "teacher_weights": mcfg.TEACHER.WEIGHTS,
            "tokens_weights": mcfg.TOKENS_WEIGHTS,
            "allow_random_teacher": mcfg.TEACHER.ALLOW_RANDOM_INIT,
            "allow_random_tokens": mcfg.ALLOW_RANDOM_TOKENS,
            "roi_reg_kd_weight": mcfg.ROI_REG_KD.WEIGHT,
            "roi_reg_kd_beta": mcfg.ROI_REG_KD.BETA,
            "dense_reg_kd_weight": mcfg.DENSE_REG_KD.WEIGHT,
            "dense_reg_kd_loss": mcfg.DENSE_REG_KD.LOSS,
            "dense_reg_kd_beta": mcfg.DENSE_REG_KD.BETA,
            "inherit": mcfg.INHERIT,
        }

    @property
    def device(self) -> torch.device:
        return self.align[self.in_features[0]].weight.device

    def train(self, mode: bool = True):
        """Set the training mode of the student; teacher and tokens stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        self.tokens.eval()
        return self

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs: a list of dicts, as detectron2's DatasetMapper produces them.

        Returns:
            training: the student's dict of scalar losses plus ``loss_maskd`` (and the enabled
                head-level KD terms); the statistics of the frozen tokens' masks on the
                teacher's features (:mod:`maskd.diagnostics`) go to the event storage.
            inference: the student's outputs, one dict per image.
        """
        if not self.training:
            return self.student(batched_inputs)
        with torch.no_grad():
            images = preprocess_images(self.teacher, batched_inputs)
            teacher_features = self.teacher.backbone(images.tensor)
        losses = self.student(batched_inputs)
        student_features = self.student.backbone.pop_features()
        masks = self.teacher_masks(teacher_features)
        per_level = self.distillation_losses(student_features, teacher_features, masks)
        storage = get_event_storage()
        padded = tuple(images.tensor.shape[-2:])
        put_token_statistics(
            storage,
            {
                lv: token_statistics(m, w, level_sizes(images.image_sizes, padded, m.shape[-2:]))
                for lv, (m, w) in masks.items()
            },
        )
        raise_if_not_finite(losses, "the student's task losses", storage.iter)
        raise_if_not_finite(per_level, "loss_maskd (per level)", storage.iter)
        for level, value in per_level.items():
            storage.put_scalar(f"maskd/loss_{level}", value.detach().item())
        extra = self.head_losses(teacher_features)
        raise_if_not_finite(extra, "the head-level distillation losses", storage.iter)
        extra["loss_maskd"] = self.loss_weight * sum(per_level.values())
        clash = set(extra) & set(losses)
        if clash:
            raise KeyError(f"the student already returns losses named {sorted(clash)}")
        losses.update(extra)
        return losses

    def head_losses(self, teacher_features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The enabled head-level KD terms of this step (weighted), from the student outputs
        recorded during its forward and the teacher's heads on its own features."""
        out = {}
        if self.roi_reg_kd_weight > 0:
            deltas, proposals = self.student.roi_heads.box_predictor.pop()
            out["loss_roi_reg_kd"] = self.roi_reg_kd_weight * roi_regression_kd_loss(
                self.teacher, teacher_features, deltas, proposals, self.roi_reg_kd_beta
            )
        if self.dense_reg_kd_weight > 0:
            student_out = self.student.head.pop()
            levels = list(self.teacher.head_in_features)
            with torch.no_grad():
                teacher_out = self.teacher.head([teacher_features[lv] for lv in levels])
            out["loss_dense_reg_kd"] = self.dense_reg_kd_weight * dense_regression_kd_loss(
                student_out[1],
                teacher_out[1],
                levels,
                self.dense_reg_kd_loss,
                self.dense_reg_kd_beta,
            )
        return out

    def custom_masks_active(self) -> bool:
        """Whether student-customised masks are used at the current iteration."""
        if self.custom_mask_warmup < 0:
            return False
        return get_event_storage().iter >= self.custom_mask_warmup

    @torch.no_grad()
    def teacher_masks(
        self, teacher_features: Dict[str, torch.Tensor]
    ) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The frozen tokens' masks and weights on the teacher's features.

        Args:
            teacher_features: level -> (N, C_t, H, W) teacher features.

        Returns:
            level -> ((N, T, H, W) masks, (N, T) weights or None), without gradient.
        """
        out = {}
        for level in self.in_features:
            rt, t = self.tokens[level], teacher_features[level]
            out[level] = (rt.masks(t), rt.weights(t) if rt.weighted else None)
        return out

    def distillation_losses(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        teacher_masks: Optional[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """The masked distillation loss of every level (unweighted).

        Args:
            student_features: level -> (N, C_s, H, W) student features.
            teacher_features: level -> (N, C_t, H, W) teacher features.
            teacher_masks: :meth:`teacher_masks` of ``teacher_features`` if already computed.

        Returns:
            level -> scalar loss.
        """
        custom = self.custom_masks_active()
        if teacher_masks is None:
            teacher_masks = self.teacher_masks(teacher_features)
        losses = {}
        for level in self.in_features:
            s, t = student_features[level], teacher_features[level]
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise ValueError(
                    f"level '{level}': student features {tuple(s.shape)} and teacher features "
                    f"{tuple(t.shape)} differ in batch or spatial size; student and teacher must "
                    "see the same padded images (same size divisibility)"
                )
            aligned = self.align[level](s)  # (N, C_t, H, W)
            masks, weights = teacher_masks[level]  # (N, T, H, W), (N, T) or None
            if custom:
                with torch.no_grad():
                    masks = masks * self.tokens[level].masks(aligned)
            losses[level] = masked_distillation_loss(aligned, t, masks, weights)
        return losses


def _check_roi_kd(student: nn.Module, teacher: nn.Module) -> None:
    s_roi, t_roi = getattr(student, "roi_heads", None), getattr(teacher, "roi_heads", None)
    if s_roi is None or isinstance(
        getattr(s_roi, "box_predictor", None), (nn.ModuleList, type(None))
    ):
        raise ValueError(
            "MODEL.MASKD.ROI_REG_KD needs an R-CNN student with StandardROIHeads, "
            f"got {type(student).__name__} / {type(s_roi).__name__}"
        )
    if t_roi is None or not hasattr(t_roi, "box_pooler"):
        raise ValueError(
            f"MODEL.MASKD.ROI_REG_KD needs an R-CNN teacher, got {type(teacher).__name__}"
        )


def _check_dense_kd(student: nn.Module, teacher: nn.Module) -> None:
    for who, m in (("student", student), ("teacher", teacher)):
        if not hasattr(m, "head") or not hasattr(m, "head_in_features"):
            raise ValueError(
                f"MODEL.MASKD.DENSE_REG_KD needs RetinaNet/FCOS-style models; the {who} is a "
                f"{type(m).__name__}"
            )
    if list(student.head_in_features) != list(teacher.head_in_features):
        raise ValueError(
            f"MODEL.MASKD.DENSE_REG_KD: the student's head reads {student.head_in_features}, "
            f"the teacher's {teacher.head_in_features}"
        )
