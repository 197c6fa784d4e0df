"""Whole-map mimicking (``uniform``): every cell weight 1, FitNet through the align conv."""

from .base import MASK_SOURCE_REGISTRY, MaskSource

__all__ = ["UniformMasks"]


@MASK_SOURCE_REGISTRY.register()
class UniformMasks(MaskSource):
    """One mask of ones over the image area (over the padded batch where the loss covers it),
    no weights: the loss is the mean squared difference of aligned student and teacher
    features over those cells and the channels."""

    NAME = "uniform"

    def forward(self, ctx):
        n, _, h, w = ctx.teacher.shape
        ones = ctx.teacher.new_ones(n, 1, h, w)  # (N, 1, H, W)
        return (ones if ctx.valid is None else ones * ctx.valid), None
