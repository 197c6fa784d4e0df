"""The ``MODEL.MASKD`` keys of a yacs config: :func:`add_maskd_config`."""

from detectron2.config import CfgNode as CN

from ..modeling.head_kd.base import add_head_kd_config
from ..modeling.mask_sources.base import add_mask_source_config
from ..projects.deeplab import add_deeplab_config

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
    _add_teacher_keys(_C)
    _add_token_keys(_C)
    _add_distillation_keys(_C)

    # "SGD" (detectron2's), "ADAM" or "ADAMW": the paper learns tokens with Adam.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # DeepLabV3/V3+ teachers and students: the keys of detectron2's DeepLab project
    add_deeplab_config(cfg)
    return cfg


def _add_teacher_keys(_C: CN) -> None:
    """``MODEL.MASKD.TEACHER``: which teacher, from which weights (both stages)."""
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


def _add_token_keys(_C: CN) -> None:
    """The receptive tokens (both stages) and the objective that learns them (stage 1)."""
    # The distilled feature levels (the teacher's names); empty: stage 1 every level the
    # teacher's heads read, stage 2 every level of the tokens that the student has at the same
    # stride (under the same name, or the one LEVEL_MAP gives). "logits" names a semantic
    # head's output before upsampling (the paper's segmentation recipe; maskd.modeling.logits).
    _C.IN_FEATURES = []
    # Receptive tokens per level (T), and whether a head predicts per-image token weights.
    _C.NUM_TOKENS = 6
    _C.WEIGHTED = True
    # Stage 1: weight of loss_dice (the Dice diversity loss, summed over levels).
    _C.DICE_WEIGHT = 1.0
    # Stage 1, opt-in (not in the paper): weight of loss_area, the mask-area prior (the mean of
    # the combined mask sum_t w_t M_t, summed over levels). 0.0: off, the paper's objective.
    _C.AREA_WEIGHT = 0.0
    # Opt-in levers of a stage-1 objective whose tokens partition the map (not in the paper;
    # docs/mask_sources.md). The first two are the tokens' form, saved with them: stage 2 must
    # have the same values.
    # How mask logits become masks: "sigmoid" (each token on its own: the paper) or "softmax"
    # (over the tokens: the masks of a cell sum to one).
    _C.MASK_NORM = "sigmoid"
    # eps in [0, 1): token weights eps / T + (1 - eps) softmax, never one-hot. 0.0: the paper.
    _C.WEIGHT_FLOOR = 0.0
    # Stage 1: what a cell switched off by the masks becomes, F~ = c F + (1 - c) fill with
    # c = sum_t w_t M_t: "zeros" (the paper), "mean" (the level's per-image channel mean) or
    # "blur" (a 5x5 box blur of the level), so that masking a cell costs the teacher less.
    _C.FILL = "zeros"
    # Stage 1: how the token weights scale the masks in the aggregate: "absolute" (the paper,
    # c = sum_t w_t M_t), "relative" (c = sum_t (w_t / max_s w_s) M_t: the most weighted
    # token's cells pass whole) or "union" (c = 1 - prod_t (1 - M_t): a cell passes whole where
    # any token covers it; the weights stay out of the teacher's view).
    _C.WEIGHT_GATE = "absolute"
    # Stage 1: weight of loss_saliency, the KL divergence of stage 2's loss over the cells
    # (sum_t w_t M_t^2 / sum M_t) from the teacher's saliency |d task loss / d c| (c: what the
    # teacher sees of a cell), summed over levels; it trains masks and weights. 0.0: off (the
    # paper). With WEIGHT_GATE "union" the weights learn from it alone.
    _C.SALIENCY_WEIGHT = 0.0
    # Stage 1: the pairs the Dice loss compares: "all" (the paper) or "weighted" (pairs weighted
    # by w_i w_j, the weights detached: the tokens that carry weight must not overlap).
    _C.DICE_PAIRS = "all"
    # Stage 1: a minimum share a of the image per token: loss_token_area = DICE_WEIGHT x mean over
    # images and tokens of relu(a - mean_hw M_t) / a. 0.0: off (the paper).
    _C.MIN_TOKEN_AREA = 0.0


def _add_distillation_keys(_C: CN) -> None:
    """Stage 2: which tokens, the levels paired, the masked feature loss, its mask source and
    the head-level terms."""
    # Stage 2: a trainable 1x1 conv from the student's channels to the teacher's on every level
    # (True: the paper's detection recipe, even where the channels agree), or none (False: the
    # paper's segmentation recipe on the logits; the channels must agree).
    _C.ALIGN = True
    # Stage 2, teacher and student levels of equal stride but different names:
    # ["TEACHER_LEVEL:STUDENT_LEVEL", ...], e.g. ["p4:res4"].
    _C.LEVEL_MAP = []
    # Stage 2: the loss and the masks over the image area only, never the padding. Always on when
    # teacher and student pad differently (e.g. a ViTDet teacher's 1024 square); off otherwise,
    # as in the published method, where both see the same padded batch.
    _C.IMAGE_AREA_ONLY = False
    # Stage 2: the learned tokens, a stage-1 checkpoint as detectron2's checkpointer writes it
    # (model_final.pth) or a tokens-only export (tools/export.py). Required in stage 2.
    _C.TOKENS_WEIGHTS = ""
    # Stage 2 with untrained random tokens when TOKENS_WEIGHTS is empty (an ablation only).
    _C.ALLOW_RANDOM_TOKENS = False
    # Stage 2 with tokens whose recorded teacher fingerprint is not this teacher's (experiments
    # only; by default such tokens are refused, see maskd/checkpoint/provenance.py).
    _C.ALLOW_TOKENS_OF_OTHER_TEACHER = False
    # Stage 2: weight of loss_maskd (the masked feature loss, summed over levels).
    _C.LOSS_WEIGHT = 1.0
    # Stage 2: from this iteration on, the teacher's masks are multiplied by the student's
    # ("student-customised masks"); negative disables.
    _C.CUSTOM_MASK_WARMUP = -1
    # Stage 2: MASK_SOURCE, where the masks of loss_maskd come from (maskd/modeling/mask_sources/):
    # "tokens" (the learned receptive tokens: the paper), "uniform" (every cell: whole-map
    # mimicking), "gt_boxes" (the ground-truth boxes' cells; GT_BOXES.BACKGROUND elsewhere),
    # "random_tokens" (untrained tokens), "gt_partition" and "gt_instances" (oracle partitions:
    # boxes and background, or each box and background, weighted separately; GT_PARTITION.* and
    # GT_INSTANCES.FOREGROUND_WEIGHT); each source declares its own keys in its file.
    add_mask_source_config(_C)

    # Head-level KD terms of the paper's detection configs, all off by default (WEIGHT 0.0):
    # MODEL.MASKD.ROI_REG_KD (WEIGHT, BETA): RoI box-regression KD for R-CNN students, and
    # MODEL.MASKD.DENSE_REG_KD (WEIGHT, LOSS "l1" | "smooth_l1", BETA): dense-head regression KD
    # for RetinaNet/FCOS students. Each term declares its keys in its file in maskd/modeling/head_kd/.
    add_head_kd_config(_C)
    # "Inheriting": start the student's neck (FPN) and heads from the teacher's weights where
    # names and shapes match (logged), before training.
    _C.INHERIT = False
