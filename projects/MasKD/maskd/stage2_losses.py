"""The losses of stage 2 (:class:`maskd.MasKD`), level by level: the masked feature loss under
the mask source's masks, the student-customised masks after the warm-up, and the head-level KD
terms."""

from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.utils.events import get_event_storage

from .batch_alignment import image_area
from .diagnostics import level_sizes
from .losses import masked_distillation_loss

__all__ = ["Stage2Losses"]


class Stage2Losses:
    """The loss computation of :class:`maskd.MasKD`, as a mixin of it. Reads the model's
    ``student``, ``teacher``, ``tokens``, ``align``, ``mask_source``, ``head_kd``,
    ``in_features``, ``student_levels``, ``strides``, ``image_area_only`` and
    ``custom_mask_warmup``."""

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
            rt = self.tokens[level]
            with torch.no_grad():
                masks, weights = self.mask_source(
                    level, rt, t, self.strides[level], valid, sizes, list(batched_inputs)
                )
            kept[level], all_sizes[level] = (masks, weights), sizes
            aligned = self.align[level](s)  # (N, C_t, H, W)
            if custom:
                with torch.no_grad():
                    masks = masks * self.mask_source.customise(level, rt, aligned)
            losses[level] = masked_distillation_loss(aligned, t, masks, weights)
        return losses, kept, all_sizes
