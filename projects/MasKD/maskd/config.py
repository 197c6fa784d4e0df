"""yacs configuration of MasKD: ``add_maskd_config(cfg)`` adds ``MODEL.MASKD``."""

from detectron2.config import CfgNode as CN

__all__ = ["add_maskd_config"]


def add_maskd_config(cfg: CN) -> CN:
    """Add the ``MODEL.MASKD`` keys to a detectron2 config, in place (and return it).

    ``MODEL.META_ARCHITECTURE`` is ``MasKDTokenLearner`` (stage 1) or ``MasKD`` (stage 2); the
    rest of ``MODEL.*`` describes the student exactly as in plain detectron2 (``MODEL.WEIGHTS``
    initialises the student). Both stages read the teacher from ``MODEL.MASKD.TEACHER``.
    """
    cfg.MODEL.MASKD = CN()
    _C = cfg.MODEL.MASKD
    # The detectron2 meta-architecture of the student (stage 2), e.g. "GeneralizedRCNN",
    # "RetinaNet", "PanopticFPN", "SemanticSegmentor"; it is built from the rest of MODEL.*.
    _C.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"

    _C.TEACHER = CN()
    # The teacher's config: a path to a yacs .yaml or LazyConfig .py file, or a detectron2
    # model-zoo name such as "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml".
    _C.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights (a path, or a detectron2:// or https:// URL). Required.
    _C.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher's config: ["KEY", "VALUE", ...] for yacs files,
    # ["key=value", ...] for LazyConfig files.
    _C.TEACHER.OPTS = []
    # Build with a randomly initialised teacher when TEACHER.WEIGHTS is empty. For tests and
    # smoke runs only: distilling from an untrained teacher is never what a user wants.
    _C.TEACHER.ALLOW_RANDOM_INIT = False

    # The distilled feature levels; empty: every level both teacher and student produce.
    _C.IN_FEATURES = []
    # Receptive tokens per level (T), and whether a head predicts per-image token weights.
    _C.NUM_TOKENS = 6
    _C.WEIGHTED = True
    # Stage 2: the learned tokens, a stage-1 checkpoint as detectron2's checkpointer writes it
    # (model_final.pth) or a tokens-only export (tools/export.py). Required in stage 2.
    _C.TOKENS_WEIGHTS = ""
    # Stage 2 with untrained random tokens when TOKENS_WEIGHTS is empty (an ablation only).
    _C.ALLOW_RANDOM_TOKENS = False
    # Stage 2: weight of loss_maskd (the masked feature loss, summed over levels).
    _C.LOSS_WEIGHT = 1.0
    # Stage 2: from this iteration on, the teacher's masks are multiplied by the student's
    # ("student-customised masks"); negative disables.
    _C.CUSTOM_MASK_WARMUP = -1
    # Stage 1: weight of loss_dice (the Dice diversity loss, summed over levels).
    _C.DICE_WEIGHT = 1.0
    return cfg
