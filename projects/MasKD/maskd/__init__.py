"""MasKD: Masked Distillation with Receptive Tokens (ICLR 2023) for Detectron2."""
