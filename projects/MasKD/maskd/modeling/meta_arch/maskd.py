"""Stage 2: masked distillation of a student from a frozen teacher through frozen tokens."""

import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from ...checkpoint.provenance import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    STUDENT_PREPROCESSING_KEY,
    TOKENS_CONFIG_KEY,
    TOKENS_KEY,
    UNTRAINED,
    TeacherPrint,
    check_token_provenance,
    fingerprint_tensor,
    student_preprocessing,
    teacher_print,
)
from ...checkpoint.tokens import tokens_from_file
from ...utils.extensions import registered_after_the_config
from ...utils.numbers import check_number
from ..backbone import RecordingBackbone
from ..diagnostics import level_sizes, put_level_statistics
from ..head_kd import HeadKD, build_head_kd
from ..inherit import inherit_neck_and_heads
from ..logits import LOGITS, LogitsRecorder, point_shapes, teacher_logits
from ..losses import masked_distillation_loss, raise_if_not_finite
from ..mask_sources import LevelContext, MaskSource, build_mask_source, mask_source_class
from ..pairing import (
    image_area,
    padding_of,
    parse_level_map,
    resolve_in_features,
    resolve_pair,
    teacher_batch,
)
from ..receptive_tokens import build_level_tokens
from ..teacher import (
    MASKD_ARCHITECTURES,
    freeze,
    head_levels,
    preprocess_images,
    teacher_from_config,
)
from ..wrappers import recording

__all__ = ["MasKD", "student_config"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MasKD(nn.Module):
    """Stage 2 of MasKD: a student distilled from a frozen teacher under receptive masks.

    Training returns the student's ordinary loss dict plus ``loss_maskd``: for every distilled
    level, the student's features go through a trainable 1x1 ``align`` conv (student channels
    -> teacher channels) and are pulled towards the teacher's under the frozen tokens' masks
    (see :func:`maskd.modeling.losses.masked_distillation_loss`); the levels are summed and multiplied
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

    Constructor arguments (keyword only):
        student: a detectron2 meta-architecture with a ``backbone``, built (its initial
            weights, e.g. ImageNet, are loaded later by the checkpointer from
            ``MODEL.WEIGHTS``).
        teacher: a detectron2 meta-architecture with a ``backbone``, with its trained
            weights loaded (:func:`maskd.modeling.teacher.build_teacher`); it may be of another kind
            than the student. It is frozen here.
        tokens: level name -> learned :class:`ReceptiveTokens`, loaded (e.g.
            :func:`maskd.checkpoint.tokens_from_file`); their levels are the distilled
            levels, which the student must produce and the teacher's heads read. Frozen
            here.
        loss_weight: weight of ``loss_maskd``.
        custom_mask_warmup: iteration from which student-customised masks are used;
            negative: never.
        head_kd: head-level KD terms (:mod:`maskd.modeling.head_kd`), each checked against the pair
            and installed on the student here.
        inherit: copy the teacher's neck and head weights into the student where names and
            shapes match.
        allow_tokens_of_other_teacher: accept tokens whose teacher fingerprint
            (:mod:`maskd.checkpoint.provenance`) is not this teacher's (experiments only).
        input_format: the channel order of the batch ("BGR", "RGB"; ``INPUT.FORMAT``);
            None: the student's ``input_format``. The student must read it; a teacher that
            reads the other of RGB/BGR gets the batch converted (:mod:`maskd.modeling.pairing`).
        in_features: the teacher levels to distil (each must be aligned); None or empty:
            every level of ``tokens`` that can be aligned with a student level.
        level_map: teacher level -> student level for levels named differently; a level
            not in it goes with the student level of its own name. Paired levels must have
            the same stride.
        image_area_only: compute the loss and masks over the image area only. Always on
            when teacher and student pad differently (then their padded areas differ);
            off otherwise, as in the published method (padding included).
        mask_source: where the masks of ``loss_maskd`` come from: a registered name
            (:mod:`maskd.modeling.mask_sources`: "tokens", the paper; "uniform", "gt_boxes",
            "random_tokens") built with its defaults, or a built :class:`MaskSource`.
        align: a trainable 1x1 conv from the student's channels to the teacher's on every
            level (the paper's detection recipe), or none (the paper's segmentation recipe on
            the logits, :data:`maskd.modeling.logits.LOGITS`; the channels must agree).
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
        mask_source: Union[str, MaskSource] = "tokens",
        align: bool = True,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        if not len(tokens):
            raise ValueError("MasKD needs receptive tokens for at least one level")
        check_number(loss_weight, "MODEL.MASKD.LOSS_WEIGHT", zero_allowed=True)
        freeze(teacher)
        device = tokens[next(iter(tokens))].tokens.device
        self._bind_tokens(teacher, tokens, allow_tokens_of_other_teacher, device)
        pairing = resolve_pair(
            teacher,
            student,
            {lv: rt.channels for lv, rt in tokens.items()},
            head_levels(teacher) + [LOGITS] * (LOGITS in tokens),
            in_features=in_features,
            level_map=level_map,
            input_format=input_format,
            image_area_only=image_area_only,
            source=getattr(tokens, "source", None),
        )
        levels = pairing.levels
        dropped = [lv for lv in tokens if lv not in levels]
        if dropped:
            logger.info("MasKD: the tokens of levels %s are not used", dropped)
            tokens = nn.ModuleDict({lv: tokens[lv] for lv in levels})
        if isinstance(mask_source, str):
            mask_source = build_mask_source(mask_source, tokens)
        if custom_mask_warmup >= 0 and not mask_source.CUSTOMISABLE:
            raise ValueError(
                f"mask source '{mask_source.NAME}' has no student-customised masks: set "
                f"MODEL.MASKD.CUSTOM_MASK_WARMUP to -1 (it is {custom_mask_warmup})"
            )
        check_head_kd(head_kd, pairing.image_area_only, teacher, student)
        self.inherited: List[str] = []
        if inherit:
            self.inherited, _ = inherit_neck_and_heads(student, teacher)
        for term in head_kd:
            term.check(student, teacher)
            term.wrap(student)
        self.head_kd = nn.ModuleList(head_kd)
        student.backbone = RecordingBackbone(student.backbone)
        if LOGITS in levels:  # the student's logits, kept by its head's predictor
            student.sem_seg_head.predictor = LogitsRecorder(student.sem_seg_head.predictor)
        self.student = student
        # the student's preprocessing, kept in checkpoints (its own buffers are not)
        self.register_buffer(STUDENT_PREPROCESSING_KEY, student_preprocessing(student).to(device))
        self.teacher = teacher
        self.tokens = freeze(tokens)
        self.mask_source = mask_source.to(device)
        self.align = build_align(pairing.channels, align).to(device)
        self.in_features = levels  # the teacher's levels (tokens, align convs, losses)
        self.student_levels = pairing.student_levels  # teacher level -> student level
        self.strides = pairing.strides
        self.input_format = pairing.input_format
        self.teacher_format = pairing.teacher_format
        self.image_area_only = pairing.image_area_only
        self.loss_weight = loss_weight
        self.custom_mask_warmup = custom_mask_warmup
        self._log_build()

    def _log_build(self) -> None:
        """Log what a built stage-2 model distils, from what, and how."""
        levels = self.in_features
        logger.info(
            "MasKD: levels %s, masks from %s (%d tokens, weighted=%s), loss weight %s, "
            "customised masks from iteration %s, head-level KD: %s; teacher input: %s, loss "
            "over %s",
            ", ".join(
                (
                    lv
                    if self.student_levels[lv] == lv
                    else f"{lv} <- student {self.student_levels[lv]}"
                )
                for lv in levels
            ),
            self.mask_source.extra_repr(),
            self.tokens[levels[0]].num_tokens,
            self.tokens[levels[0]].weighted,
            self.loss_weight,
            self.custom_mask_warmup if self.custom_mask_warmup >= 0 else "never",
            ", ".join(f"{t.LOSS_NAME} ({t.extra_repr()})" for t in self.head_kd) or "none",
            (
                f"converted {self.input_format} -> {self.teacher_format}"
                if self.teacher_format
                else "as loaded"
            ),
            "the image area" if self.image_area_only else "the padded batch",
        )

    def _bind_tokens(self, teacher, tokens, allow_other: bool, device) -> None:
        """Check the tokens' provenance against the teacher, and keep both teachers'
        fingerprints as buffers: this teacher's, and those of the teacher the tokens were
        learned for (they stay with the tokens through this model's checkpoints)."""
        ours = teacher_print(teacher)
        theirs = getattr(tokens, "teacher_print", TeacherPrint(None, None))
        check_token_provenance(getattr(tokens, "source", None), theirs, ours, allow_other)
        if getattr(tokens, "source", None) is None:  # built here: untrained (an ablation)
            theirs = TeacherPrint(UNTRAINED, None)
        self.allow_tokens_of_other_teacher = allow_other
        for key, value in (
            (FINGERPRINT_KEY, ours.weights),
            (CONFIG_KEY, ours.config),
            (TOKENS_KEY, theirs.weights),
            (TOKENS_CONFIG_KEY, theirs.config),
        ):
            self.register_buffer(key, fingerprint_tensor(value).to(device))

    @classmethod
    def from_config(cls, cfg):
        """Builds the student from ``MODEL.*``, the teacher (loaded) from
        ``MODEL.MASKD.TEACHER``, the tokens (loaded) from ``MODEL.MASKD.TOKENS_WEIGHTS`` and
        the head-level KD terms whose ``WEIGHT`` is positive."""
        mcfg = cfg.MODEL.MASKD
        if mcfg.STUDENT_META_ARCHITECTURE in MASKD_ARCHITECTURES:
            raise ValueError(
                "MODEL.MASKD.STUDENT_META_ARCHITECTURE must name the student's own "
                f"meta-architecture, got '{mcfg.STUDENT_META_ARCHITECTURE}'"
            )
        student = build_model(student_config(cfg))
        teacher = teacher_from_config(cfg)
        source = mask_source_class(mcfg.MASK_SOURCE)
        tokens = stage2_tokens(mcfg, teacher, source.LEARNED_TOKENS)
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
            "mask_source": source.from_tokens(tokens, **_source_args(source, mcfg)),
            "align": mcfg.ALIGN,
        }

    @classmethod
    def build_inference_model(cls, cfg) -> nn.Module:
        """The model that evaluates a checkpoint of this stage-2 config (``--eval-only``): the
        student alone, from its own config; MasKD's inference is the student's, so teacher and
        tokens are neither built nor read (the checkpoint's ``student.*`` weights load into it).
        """
        return build_model(student_config(cfg))

    @classmethod
    def lazy_inference_node(cls, node):
        """:meth:`build_inference_model` for a LazyConfig ``model`` node: its ``student``."""
        return node.student

    @property
    def device(self) -> torch.device:
        return self.tokens[self.in_features[0]].tokens.device

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
                head-level KD terms); the statistics of the mask source's masks on the
                teacher's features (:mod:`maskd.modeling.diagnostics`) go to the event storage.
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
            if LOGITS in self.in_features:
                teacher_features[LOGITS] = teacher_logits(self.teacher, teacher_features)
        with recording(self.student):  # what the student's forward made, for this step only
            losses = self.student(batched_inputs)
            student_features = dict(self.student.backbone.recorded("features"))
            if LOGITS in self.in_features:
                student_features[LOGITS] = self.student.sem_seg_head.predictor.recorded("logits")
            extra = self.head_losses(teacher_features)
        storage = get_event_storage()
        per_level, masks, sizes = self.distillation_losses(
            student_features,
            teacher_features,
            images.image_sizes,
            tuple(images.tensor.shape[-2:]),
            batched_inputs,
        )
        levels = {lv: (m, w, sizes[lv]) for lv, (m, w) in masks.items()}
        put_level_statistics(storage, levels, batched_inputs, self.strides)
        raise_if_not_finite(losses, "the student's task losses", storage.iter)
        raise_if_not_finite(per_level, "loss_maskd (per level)", storage.iter)
        for level, value in per_level.items():
            storage.put_scalar(f"maskd/loss_{level}", value.detach().item())
        raise_if_not_finite(extra, "the head-level distillation losses", storage.iter)
        extra["loss_maskd"] = self.loss_weight * sum(per_level.values())
        clash = set(extra) & set(losses)
        if clash:
            raise KeyError(f"the student already returns losses named {sorted(clash)}")
        losses.update(extra)
        return losses

    # --- the losses, level by level ------------------------------------------------------

    def head_losses(self, teacher_features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The head-level KD terms of this step (weighted), from what the student's wrappers kept
        in its forward (inside :func:`maskd.modeling.wrappers.recording`) and the teacher's heads
        on its own features."""
        return {
            term.LOSS_NAME: term(self.student, self.teacher, teacher_features)
            for term in self.head_kd
        }

    def custom_masks_active(self) -> bool:
        """Whether student-customised masks are used at the current iteration."""
        if self.custom_mask_warmup < 0:
            return False
        return get_event_storage().iter >= self.custom_mask_warmup

    def level_pair(self, level, student_features, teacher_features, image_sizes, padded):
        """One distilled level's features as the loss compares them.

        Returns:
            ((N, C_s, H, W) student, (N, C_t, H, W) teacher features, (N, 1, H, W) image-area
            cells or None (the loss covers the padded batch), N (h_l, w_l) image-area sizes).
        """
        s = student_features[self.student_levels[level]]
        t = teacher_features[level]
        if self.image_area_only:
            t, s, valid, sizes = image_area(t, s, image_sizes, self.strides[level])
            return s, t, valid, sizes
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"level '{level}': student features {tuple(s.shape)} and teacher features "
                f"{tuple(t.shape)} differ in batch or spatial size; student and teacher must "
                "see the same padded images (same size divisibility), or set "
                "MODEL.MASKD.IMAGE_AREA_ONLY"
            )
        if image_sizes is None:  # the whole maps
            return s, t, None, [tuple(t.shape[-2:])] * t.shape[0]
        return s, t, None, level_sizes(image_sizes, padded, t.shape[-2:])

    def distillation_losses(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        padded: Optional[Tuple[int, int]] = None,
        batched_inputs: Sequence[dict] = (),
    ):
        """The masked distillation loss of every level (unweighted), with the masks of the
        mask source.

        Args:
            student_features: student level -> (N, C_s, H_s, W_s) features.
            teacher_features: teacher level -> (N, C_t, H_t, W_t) features.
            image_sizes: N (h, w) sizes of the images before padding; None: every image fills
                the maps (only where the loss covers the padded batch).
            padded: (H, W) of the padded batch (with ``image_sizes``).
            batched_inputs: the step's inputs (for sources that read the ground truth).

        Returns:
            (level -> scalar loss; level -> ((N, T, H, W) masks of the source before
            customisation, (N, T) weights or None), without gradient; level -> N (h_l, w_l)
            image-area sizes).
        """
        if self.image_area_only and image_sizes is None:
            raise ValueError("the loss over the image area needs the image sizes")
        custom = self.custom_masks_active()
        losses, kept, all_sizes = {}, {}, {}
        for level in self.in_features:
            s, t, valid, sizes = self.level_pair(
                level, student_features, teacher_features, image_sizes, padded
            )
            ctx = LevelContext(
                level,
                self.tokens[level],
                t,
                self.strides[level],
                valid,
                sizes,
                list(batched_inputs),
            )
            with torch.no_grad():
                masks, weights = self.mask_source(ctx)
            kept[level], all_sizes[level] = (masks, weights), sizes
            aligned = self.align[level](s)  # (N, C_t, H, W)
            if custom:
                with torch.no_grad():
                    masks = masks * self.mask_source.customise(ctx, aligned)
            losses[level] = masked_distillation_loss(aligned, t, masks, weights)
        return losses, kept, all_sizes


def build_align(channels: Dict[str, Tuple[int, int]], align: bool = True) -> nn.ModuleDict:
    """The student-to-teacher channel alignment of each distilled level: a trainable 1x1 conv
    (the paper's detection recipe, used even where the channels agree), or, with ``align``
    False (the paper's segmentation recipe on logits), none.

    Args:
        channels: level -> (student channels, teacher channels).

    Raises:
        ValueError: ``align`` False where a level's channels differ, naming it.
    """
    if not align:
        differ = {lv: c for lv, c in channels.items() if c[0] != c[1]}
        if differ:
            raise ValueError(
                "MODEL.MASKD.ALIGN False compares the student's levels with the teacher's "
                "directly, but their channels differ: "
                + ", ".join(f"'{lv}' student {cs}, teacher {ct}" for lv, (cs, ct) in differ.items())
            )
        return nn.ModuleDict({lv: nn.Identity() for lv in channels})
    return nn.ModuleDict(
        {lv: nn.Conv2d(cs, ct, kernel_size=1) for lv, (cs, ct) in channels.items()}
    )


def _source_args(source, mcfg) -> dict:
    """The mask source's arguments from ``MODEL.MASKD``, or a clear error if its keys are not
    there (a source registered after the config was made)."""
    try:
        return source.from_config(mcfg)
    except (AttributeError, KeyError) as e:
        raise registered_after_the_config(
            f"mask source '{source.NAME}' reads keys that MODEL.MASKD does not have ({e})"
        ) from None


def student_config(cfg):
    """The student's own yacs config in a stage-2 config: ``MODEL.META_ARCHITECTURE`` set to
    ``MODEL.MASKD.STUDENT_META_ARCHITECTURE`` (a copy; ``cfg`` is not changed)."""
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = cfg.MODEL.MASKD.STUDENT_META_ARCHITECTURE
    return out


def check_head_kd(
    head_kd: Sequence[HeadKD], image_area_only: bool, teacher: nn.Module, student: nn.Module
) -> None:
    """Refuse head-level KD terms that the pair cannot have: cell-by-cell terms where the two
    models pad differently (or the loss covers the image area only), or two terms of one loss
    name."""
    for term in head_kd:
        if image_area_only and term.SAME_GRID:
            raise ValueError(
                f"{term.LOSS_NAME} compares the teacher's and the student's dense head outputs "
                "cell by cell, which needs both to pad alike; teacher "
                f"{padding_of(teacher)} and student {padding_of(student)} do not, or "
                "IMAGE_AREA_ONLY is set"
            )
    names = [term.LOSS_NAME for term in head_kd]
    if len(set(names)) != len(names):
        raise ValueError(f"head-level KD terms with the same loss name: {names}")


def stage2_tokens(mcfg, teacher: nn.Module, learned: bool) -> nn.ModuleDict:
    """The tokens of a stage-2 yacs config (``MODEL.MASKD``): loaded from ``TOKENS_WEIGHTS``
    (levels and shapes from the file), or untrained on the levels the teacher's heads read where
    allowed (``ALLOW_RANDOM_TOKENS``) or where the mask source does not use learned tokens.

    Raises:
        ValueError: ``TOKENS_WEIGHTS`` is empty and neither is the case.
    """
    if mcfg.TOKENS_WEIGHTS:
        # levels and shapes from the file; the constructor keeps those it can align
        tokens = tokens_from_file(
            mcfg.TOKENS_WEIGHTS,
            mcfg.NUM_TOKENS,
            mcfg.WEIGHTED,
            "MODEL.MASKD.TOKENS_WEIGHTS",
            mask_norm=mcfg.MASK_NORM,
            weight_floor=mcfg.WEIGHT_FLOOR,
        )
    elif mcfg.ALLOW_RANDOM_TOKENS or not learned:
        if learned:
            logger.warning("MODEL.MASKD.TOKENS_WEIGHTS is empty: distilling with random tokens")
        t_shapes = point_shapes(teacher, with_logits=LOGITS in mcfg.IN_FEATURES)
        read = head_levels(teacher) + [LOGITS] * (LOGITS in t_shapes)
        levels = resolve_in_features(list(mcfg.IN_FEATURES), {"teacher": read})
        tokens = build_level_tokens(
            {lv: t_shapes[lv].channels for lv in levels},
            mcfg.NUM_TOKENS,
            mcfg.WEIGHTED,
            mcfg.MASK_NORM,
            mcfg.WEIGHT_FLOOR,
        )
    else:
        raise ValueError(
            "MODEL.MASKD.TOKENS_WEIGHTS is empty: stage 2 needs the receptive tokens learned "
            "in stage 1 (its model_final.pth, or a tokens export); set "
            "MODEL.MASKD.ALLOW_RANDOM_TOKENS only for the random-token ablation"
        )
    return tokens
