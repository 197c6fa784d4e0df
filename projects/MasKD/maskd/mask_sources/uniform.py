"""Whole-map mimicking (``uniform``): every cell weight 1, FitNet through the align conv."""

from .base import MASK_SOURCE_REGISTRY, MaskSource

__all__ = ["UniformMasks"]


@MASK_SOURCE_REGISTRY.register()
class UniformMasks(MaskSource):
    """One mask of ones over the image area (over the padded batch where the loss covers it),
    no weights: the loss is the mean squared difference of aligned student and teacher
    features over those cells and the channels."""

    NAME = "uniform"

    def forward(self, level, tokens, teacher, stride, valid, sizes, batched_inputs):
        n, _, h, w = teacher.shape
        ones = teacher.new_ones(n, 1, h, w)  # (N, 1, H, W)
        return (ones if valid is None else ones * valid), None
