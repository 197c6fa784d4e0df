"""Stage 2: masked distillation of a student from a frozen teacher through frozen tokens."""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from .backbone import RecordingBackbone
from .checkpoint import tokens_from_file
from .diagnostics import level_sizes, put_token_statistics, token_statistics
from .head_kd import HeadKD, build_head_kd
from .inherit import inherit_neck_and_heads
from .losses import masked_distillation_loss, raise_if_not_finite
from .pairing import (
    check_channel_orders,
    image_area,
    padding_of,
    pair_levels,
    parse_level_map,
    teacher_batch,
)
from .provenance import FINGERPRINT_KEY, fingerprint, fingerprint_tensor
from .receptive_tokens import build_level_tokens
from .teacher import freeze, head_levels, preprocess_images, teacher_from_config
from .token_learner import resolve_in_features

__all__ = ["MasKD", "student_config"]

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
        tokens: nn.ModuleDict,
        loss_weight: float = 1.0,
        custom_mask_warmup: int = -1,
        head_kd: Sequence[HeadKD] = (),
        inherit: bool = False,
        allow_tokens_of_other_teacher: bool = False,
        input_format: Optional[str] = None,
        in_features: Optional[Sequence[str]] = None,
        level_map: Optional[Dict[str, str]] = None,
        image_area_only: bool = False,
    ):
        """
        Args:
            student: a detectron2 meta-architecture with a ``backbone``, built (its initial
                weights, e.g. ImageNet, are loaded later by the checkpointer from
                ``MODEL.WEIGHTS``).
            teacher: a detectron2 meta-architecture with a ``backbone``, with its trained
                weights loaded (:func:`maskd.teacher.build_teacher`); it may be of another kind
                than the student. It is frozen here.
            tokens: level name -> learned :class:`ReceptiveTokens`, loaded (e.g.
                :func:`maskd.checkpoint.tokens_from_file`); their levels are the distilled
                levels, which the student must produce and the teacher's heads read. Frozen
                here.
            loss_weight: weight of ``loss_maskd``.
            custom_mask_warmup: iteration from which student-customised masks are used;
                negative: never.
            head_kd: head-level KD terms (:mod:`maskd.head_kd`), each checked against the pair
                and installed on the student here.
            inherit: copy the teacher's neck and head weights into the student where names and
                shapes match.
            allow_tokens_of_other_teacher: accept tokens whose teacher fingerprint
                (:mod:`maskd.provenance`) is not this teacher's (experiments only).
            input_format: the channel order of the batch ("BGR", "RGB"; ``INPUT.FORMAT``);
                None: the student's ``input_format``. The student must read it; a teacher that
                reads the other of RGB/BGR gets the batch converted (:mod:`maskd.pairing`).
            in_features: the teacher levels to distil (each must be aligned); None or empty:
                every level of ``tokens`` that can be aligned with a student level.
            level_map: teacher level -> student level for levels named differently; a level
                not in it goes with the student level of its own name. Paired levels must have
                the same stride.
            image_area_only: compute the loss and masks over the image area only. Always on
                when teacher and student pad differently (then their padded areas differ);
                off otherwise, as in the published method (padding included).
        """
        super().__init__()
        if not len(tokens):
            raise ValueError("MasKD needs receptive tokens for at least one level")
        freeze(teacher)
        teacher_print = fingerprint(teacher.state_dict())
        check_token_provenance(tokens, teacher_print, allow_tokens_of_other_teacher)
        device = tokens[next(iter(tokens))].tokens.device
        self.register_buffer(FINGERPRINT_KEY, fingerprint_tensor(teacher_print).to(device))
        t_shapes = teacher.backbone.output_shape()
        s_shapes = student.backbone.output_shape()
        read = head_levels(teacher)
        if in_features:
            missing = [lv for lv in in_features if lv not in tokens]
            if missing:
                raise ValueError(
                    f"MODEL.MASKD.IN_FEATURES names levels {missing}, but the receptive tokens "
                    f"are for levels {list(tokens)}"
                )
        candidates = (
            list(in_features)
            if in_features
            else [lv for lv in read if lv in tokens] + [lv for lv in tokens if lv not in read]
        )
        unread = [lv for lv in candidates if lv not in read]
        if unread:
            raise ValueError(
                f"receptive tokens for levels {unread}, which the teacher's heads do not read "
                f"(they read {read}): were the tokens learned on another teacher?"
            )
        pairs = pair_levels(
            {lv: t_shapes[lv] for lv in read},
            s_shapes,
            candidates,
            level_map,
            explicit=bool(in_features),
        )
        source = getattr(tokens, "source", None)
        levels = list(pairs)
        dropped = [lv for lv in tokens if lv not in pairs]
        if dropped:
            logger.info("MasKD: the tokens of levels %s are not used", dropped)
            tokens = nn.ModuleDict({lv: tokens[lv] for lv in levels})
        for lv in levels:
            if tokens[lv].channels != t_shapes[lv].channels:
                raise ValueError(
                    f"the receptive tokens of level '{lv}'"
                    + (f" in '{source}'" if source else "")
                    + f" have {tokens[lv].channels} channels, "
                    f"the teacher's '{lv}' features {t_shapes[lv].channels}: were the tokens "
                    "learned on another teacher?"
                )
        s_format = getattr(student, "input_format", None)
        input_format = input_format or s_format
        if s_format and input_format and s_format != input_format:
            raise ValueError(
                f"the student reads {s_format} images but the data are {input_format} "
                "(INPUT.FORMAT): the student is trained on the data as they are loaded"
            )
        t_format = getattr(teacher, "input_format", None)
        if not input_format:
            logger.warning(
                "neither input_format nor the student's input_format is set: assuming the data "
                "are in the teacher's channel order (%s)",
                t_format,
            )
            input_format = t_format
        self.input_format = input_format
        self.teacher_format = (
            t_format if check_channel_orders(input_format, t_format, "the teacher") else None
        )
        if not t_format and input_format:
            logger.warning(
                "the teacher declares no input_format: assuming it reads the data's channel "
                "order (%s)",
                input_format,
            )
        forced = padding_of(teacher) != padding_of(student)
        self.image_area_only = bool(image_area_only or forced)
        for term in head_kd:
            if self.image_area_only and term.SAME_GRID:
                raise ValueError(
                    f"{term.LOSS_NAME} compares the teacher's and the student's dense head outputs "
                    "cell by cell, which needs both to pad alike; teacher "
                    f"{padding_of(teacher)} and student {padding_of(student)} do not, or "
                    "IMAGE_AREA_ONLY is set"
                )
        self.inherited: List[str] = []
        if inherit:
            self.inherited, _ = inherit_neck_and_heads(student, teacher)
        for term in head_kd:
            term.check(student, teacher)
            term.wrap(student)
        names = [term.LOSS_NAME for term in head_kd]
        if len(set(names)) != len(names):
            raise ValueError(f"head-level KD terms with the same loss name: {names}")
        self.head_kd = nn.ModuleList(head_kd)
        student.backbone = RecordingBackbone(student.backbone)
        self.student = student
        self.teacher = teacher
        self.tokens = freeze(tokens)
        self.align = nn.ModuleDict(
            {
                lv: nn.Conv2d(s_shapes[pairs[lv]].channels, t_shapes[lv].channels, kernel_size=1)
                for lv in levels
            }
        ).to(tokens[levels[0]].tokens.device)
        self.in_features = levels  # the teacher's levels (tokens, align convs, losses)
        self.student_levels = pairs  # teacher level -> student level
        self.strides = {lv: t_shapes[lv].stride for lv in levels}
        self.loss_weight = loss_weight
        self.custom_mask_warmup = custom_mask_warmup
        logger.info(
            "MasKD: levels %s, %d tokens (weighted=%s), loss weight %s, customised masks from "
            "iteration %s, head-level KD: %s; teacher input: %s, loss over %s",
            ", ".join(lv if pairs[lv] == lv else f"{lv} <- student {pairs[lv]}" for lv in levels),
            tokens[levels[0]].num_tokens,
            tokens[levels[0]].weighted,
            loss_weight,
            custom_mask_warmup if custom_mask_warmup >= 0 else "never",
            ", ".join(f"{t.LOSS_NAME} ({t.extra_repr()})" for t in head_kd) or "none",
            f"converted {input_format} -> {t_format}" if self.teacher_format else "as loaded",
            "the image area" if self.image_area_only else "the padded batch",
        )

    @classmethod
    def from_config(cls, cfg):
        """Builds the student from ``MODEL.*``, the teacher (loaded) from
        ``MODEL.MASKD.TEACHER``, the tokens (loaded) from ``MODEL.MASKD.TOKENS_WEIGHTS`` and
        the head-level KD terms whose ``WEIGHT`` is positive."""
        mcfg = cfg.MODEL.MASKD
        if mcfg.STUDENT_META_ARCHITECTURE in ("MasKD", "MasKDTokenLearner"):
            raise ValueError(
                "MODEL.MASKD.STUDENT_META_ARCHITECTURE must name the student's own "
                f"meta-architecture, got '{mcfg.STUDENT_META_ARCHITECTURE}'"
            )
        student = build_model(student_config(cfg))
        teacher = teacher_from_config(cfg)
        if mcfg.TOKENS_WEIGHTS:
            # levels and shapes from the file; the constructor keeps those it can align
            tokens = tokens_from_file(
                mcfg.TOKENS_WEIGHTS, mcfg.NUM_TOKENS, mcfg.WEIGHTED, "MODEL.MASKD.TOKENS_WEIGHTS"
            )
        elif mcfg.ALLOW_RANDOM_TOKENS:
            logger.warning("MODEL.MASKD.TOKENS_WEIGHTS is empty: distilling with random tokens")
            t_shapes = teacher.backbone.output_shape()
            levels = resolve_in_features(list(mcfg.IN_FEATURES), {"teacher": head_levels(teacher)})
            tokens = build_level_tokens(
                {lv: t_shapes[lv].channels for lv in levels}, mcfg.NUM_TOKENS, mcfg.WEIGHTED
            )
        else:
            raise ValueError(
                "MODEL.MASKD.TOKENS_WEIGHTS is empty: stage 2 needs the receptive tokens learned "
                "in stage 1 (its model_final.pth, or a tokens export); set "
                "MODEL.MASKD.ALLOW_RANDOM_TOKENS only for the random-token ablation"
            )
        return {
            "student": student,
            "teacher": teacher,
            "tokens": tokens.to(cfg.MODEL.DEVICE),
            "loss_weight": mcfg.LOSS_WEIGHT,
            "custom_mask_warmup": mcfg.CUSTOM_MASK_WARMUP,
            "head_kd": build_head_kd(mcfg),
            "inherit": mcfg.INHERIT,
            "allow_tokens_of_other_teacher": mcfg.ALLOW_TOKENS_OF_OTHER_TEACHER,
            "input_format": cfg.INPUT.FORMAT,
            "in_features": list(mcfg.IN_FEATURES),
            "level_map": parse_level_map(mcfg.LEVEL_MAP),
            "image_area_only": mcfg.IMAGE_AREA_ONLY,
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
            # the teacher's channel order; its square checked where the image area is cut out
            square = self.teacher if self.image_area_only else None
            teacher_inputs = teacher_batch(
                batched_inputs, self.input_format, self.teacher_format, square
            )
            images = preprocess_images(self.teacher, teacher_inputs)
            teacher_features = self.teacher.backbone(images.tensor)
        losses = self.student(batched_inputs)
        student_features = self.student.backbone.pop_features()
        storage = get_event_storage()
        if self.image_area_only:
            pairs, masks, sizes = self.image_area_pairs(
                student_features, teacher_features, images.image_sizes
            )
            per_level = self.distillation_losses(*pairs, masks)
        else:
            masks = self.teacher_masks(teacher_features)
            per_level = self.distillation_losses(
                {lv: student_features[s] for lv, s in self.student_levels.items()},
                teacher_features,
                masks,
            )
            padded = tuple(images.tensor.shape[-2:])
            sizes = {
                lv: level_sizes(images.image_sizes, padded, m.shape[-2:])
                for lv, (m, _) in masks.items()
            }
        put_token_statistics(
            storage, {lv: token_statistics(m, w, sizes[lv]) for lv, (m, w) in masks.items()}
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

    @torch.no_grad()
    def _image_area_masks(self, level, teacher, valid, sizes):
        rt = self.tokens[level]
        masks = rt.masks(teacher) * valid  # (N, T, H, W), zero outside the image
        weights = None
        if rt.weighted:  # pooled over each image's own area
            weights = torch.cat(
                [rt.weights(teacher[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)]
            )  # (N, T)
        return masks, weights

    def image_area_pairs(self, student_features, teacher_features, image_sizes):
        """Cut every distilled level to the common grid of both models (a pair that pads
        differently) and make the masks over the image area only.

        Args:
            student_features: student level -> (N, C_s, H_s, W_s).
            teacher_features: teacher level -> (N, C_t, H_t, W_t).
            image_sizes: N (h, w) sizes of the images before padding.

        Returns:
            ((teacher level -> (N, C_s, H, W) student features, teacher level -> (N, C_t, H, W)
            teacher features), teacher level -> ((N, T, H, W) masks, zero outside the image,
            (N, T) weights or None), teacher level -> N (h_l, w_l) image-area sizes).
        """
        students, teachers, masks, sizes = {}, {}, {}, {}
        for lv, s_lv in self.student_levels.items():
            t, s, valid, sizes[lv] = image_area(
                teacher_features[lv], student_features[s_lv], image_sizes, self.strides[lv]
            )
            students[lv], teachers[lv] = s, t
            masks[lv] = self._image_area_masks(lv, t, valid, sizes[lv])
        return (students, teachers), masks, sizes

    def head_losses(self, teacher_features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The head-level KD terms of this step (weighted), from what the student recorded in
        its forward and the teacher's heads on its own features."""
        return {
            term.LOSS_NAME: term(self.student, self.teacher, teacher_features)
            for term in self.head_kd
        }

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
            student_features: teacher level -> (N, C_s, H, W) features of the student level
                paired with it (the same level name in a homogeneous pair).
            teacher_features: level -> (N, C_t, H, W) teacher features.
            teacher_masks: :meth:`teacher_masks` of ``teacher_features`` if already computed
                (or the image-area masks of :meth:`image_area_pairs`).

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
                    "see the same padded images (same size divisibility), or set "
                    "MODEL.MASKD.IMAGE_AREA_ONLY"
                )
            aligned = self.align[level](s)  # (N, C_t, H, W)
            masks, weights = teacher_masks[level]  # (N, T, H, W), (N, T) or None
            if custom:
                with torch.no_grad():
                    masks = masks * self.tokens[level].masks(aligned)
            losses[level] = masked_distillation_loss(aligned, t, masks, weights)
        return losses


def student_config(cfg):
    """The student's own yacs config in a stage-2 config: ``MODEL.META_ARCHITECTURE`` set to
    ``MODEL.MASKD.STUDENT_META_ARCHITECTURE`` (a copy; ``cfg`` is not changed)."""
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = cfg.MODEL.MASKD.STUDENT_META_ARCHITECTURE
    return out


def check_token_provenance(tokens: nn.ModuleDict, teacher_print: str, allow_other: bool) -> None:
    """Refuse tokens learned for another teacher.

    Args:
        tokens: level -> ReceptiveTokens; tokens read from a file carry ``source`` (the path)
            and ``teacher_fingerprint`` (the file's, or None for files made before
            fingerprints existed).
        teacher_print: the fingerprint of the teacher at hand.
        allow_other: only warn on a mismatch.
    """
    source = getattr(tokens, "source", None)
    if source is None:
        return  # built here (random tokens, an ablation): nothing to compare
    theirs = getattr(tokens, "teacher_fingerprint", None)
    if theirs is None:
        logger.warning(
            "the tokens of '%s' carry no teacher fingerprint (a file made before MasKD recorded "
            "it): cannot verify that they were learned for this teacher",
            source,
        )
        return
    if theirs == teacher_print:
        return
    message = (
        f"the receptive tokens of '{source}' were learned for another teacher: their teacher "
        f"fingerprint is {theirs[:16]}..., this teacher's is {teacher_print[:16]}... (SHA-256 of "
        "the weights). Tokens only make sense on the features of their own teacher: learn "
        "them for this one (stage 1), or set MODEL.MASKD.ALLOW_TOKENS_OF_OTHER_TEACHER for an "
        "experiment"
    )
    if not allow_other:
        raise ValueError(message)
    logger.warning("%s (allowed by ALLOW_TOKENS_OF_OTHER_TEACHER)", message)
