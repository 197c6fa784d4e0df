"""Every config of the project loads and builds its model on CPU, without any weights."""

import glob
import os
import re

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from maskd import MasKD, MasKDTokenLearner
from maskd.config import get_maskd_cfg, load_config, resolve_config_file
from maskd.modeling.receptive_tokens import build_level_tokens
from maskd.utils.numbers import check_fraction, check_number

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
YAML = sorted(
    glob.glob(os.path.join(ROOT, "COCO-*", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "Misc", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "Cityscapes-*", "*.yaml"))
)
LAZY = sorted(glob.glob(os.path.join(ROOT, "COCO-*", "*.py")))  # configs/Demo: tests/test_demo.py
NO_WEIGHTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.MASKD.TEACHER.ALLOW_RANDOM_INIT",
    "True",
    "MODEL.MASKD.TEACHER.WEIGHTS",
    "",
    "MODEL.MASKD.ALLOW_RANDOM_TOKENS",
    "True",
    "MODEL.MASKD.TOKENS_WEIGHTS",
    "",
]


try:
    from detectron2 import _C  # noqa: F401  (compiled ops, e.g. deformable convolution)

    _HAS_COMPILED_OPS = True
except ImportError:
    _HAS_COMPILED_OPS = False


def _name(path):
    return os.path.relpath(path, ROOT)


# The paper's pairs as yacs configs, each in both stages, and the feature-only ablation; FCOS
# exists in detectron2 as a LazyConfig only, as do the heterogeneous teachers (ViTDet, Swin, the
# LSJ baseline).
YAML_PAIRS = {
    "COCO-Detection/maskd_cascade_mask_rcnn_X_152-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_faster_rcnn_X_101_32x8d-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_retinanet_R_101-retinanet_R_50_FPN",
    "COCO-InstanceSegmentation/maskd_mask_rcnn_R_101-mask_rcnn_R_50_FPN",
    "COCO-PanopticSegmentation/maskd_panoptic_fpn_R_101-panoptic_fpn_R_50",
    "Cityscapes-SemanticSegmentation/maskd_deeplab_v3_R_103-deeplab_v3_R_50",
    "Cityscapes-SemanticSegmentation/maskd-res5_deeplab_v3_R_103-deeplab_v3_R_50",
    "Misc/maskd_semantic_R_101-semantic_R_50_FPN",
}
LAZY_PAIRS = {
    "COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_mask_rcnn_R_101_LSJ-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_retinanet_R_101-fcos_R_50_FPN",
    "COCO-Detection/maskd_swin_b-faster_rcnn_R_50_FPN",
    "COCO-Detection/maskd_vitdet_b-faster_rcnn_R_50_FPN",
}


def _pairs(paths, ext):
    """{pair: stages} from config paths ``<pair>_<stage>_<dataset>.<ext>``."""
    out = {}
    for path in paths:
        name = _name(path)
        match = re.fullmatch(rf"(.+)_(tokens|2x|40k|90k)_(coco|cityscapes)\.{ext}", name)
        assert match, name
        out.setdefault(match.group(1), set()).add(match.group(2))
    return out


def test_configs_exist():
    yaml = _pairs([p for p in YAML if "featonly" not in p], "yaml")
    assert set(yaml) == YAML_PAIRS
    assert all(len(stages) == 2 and "tokens" in stages for stages in yaml.values()), yaml
    lazy = _pairs(LAZY, "py")
    assert set(lazy) == LAZY_PAIRS
    assert all(stages == {"tokens", "2x"} for stages in lazy.values()), lazy
    assert [_name(p) for p in YAML if "featonly" in p] == [
        "COCO-Detection/maskd-featonly_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml"
    ]


@pytest.mark.parametrize("path", YAML, ids=_name)
def test_yacs_config_builds(path):
    cfg = get_maskd_cfg()
    cfg.merge_from_file(path)
    stage = cfg.MODEL.META_ARCHITECTURE
    assert stage in ("MasKD", "MasKDTokenLearner")
    # Teacher names resolve to configs shipped in detectron2's model zoo.
    assert os.path.isfile(resolve_config_file(cfg.MODEL.MASKD.TEACHER.CONFIG_FILE))
    weights = cfg.MODEL.MASKD.TEACHER.WEIGHTS
    assert weights.startswith("detectron2://") or "semantic" in path, "zoo teacher weights"
    if stage == "MasKD":
        assert re.search(
            r"_tokens_(coco|cityscapes)/model_final.pth$", cfg.MODEL.MASKD.TOKENS_WEIGHTS
        )
        # Every stage-2 config reads the output of a stage-1 config beside it.
        tokens_name = cfg.MODEL.MASKD.TOKENS_WEIGHTS.split("/")[1]
        tokens_cfg = os.path.join(os.path.dirname(path), tokens_name + ".yaml")
        assert os.path.isfile(tokens_cfg), tokens_cfg
        stage1 = get_maskd_cfg()
        stage1.merge_from_file(tokens_cfg)
        assert cfg.MODEL.MASKD.TOKENS_WEIGHTS == os.path.join(stage1.OUTPUT_DIR, "model_final.pth")
        # 2x; on Cityscapes the paper's 40k on the logits, the DeepLab project's 90k on res5
        schedule = {"40k": 40000, "90k": 90000}.get(path.rsplit("_", 2)[-2], 180000)
        assert cfg.SOLVER.MAX_ITER == schedule, path
    else:
        assert cfg.SOLVER.MAX_ITER == 2000 and cfg.MODEL.WEIGHTS == ""
    cfg.merge_from_list(NO_WEIGHTS)
    teacher = load_config(resolve_config_file(cfg.MODEL.MASKD.TEACHER.CONFIG_FILE))
    if any(teacher.MODEL.RESNETS.DEFORM_ON_PER_STAGE) and not _HAS_COMPILED_OPS:
        # the Cascade X152 teacher: detectron2 says what is missing, then it builds without DCN
        with pytest.raises(ImportError, match="DeformConv"):
            build_model(cfg)
        no_dcn = ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, False]"]
        cfg.MODEL.MASKD.TEACHER.OPTS = list(cfg.MODEL.MASKD.TEACHER.OPTS) + no_dcn
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MasKD if stage == "MasKD" else MasKDTokenLearner)


@pytest.mark.parametrize("path", LAZY, ids=_name)
def test_lazy_config_builds(path):
    cfg = LazyConfig.load(path)
    assert cfg.train.output_dir.startswith("output/")
    assert os.path.isfile(resolve_config_file(cfg.model.teacher.config_file))
    assert cfg.model.teacher.weights.startswith("detectron2://")
    cfg.model.teacher.weights = ""
    cfg.model.teacher.allow_random_init = True
    if "tokens" in cfg.model:  # stage 2: random tokens of the teacher's FPN width (256)
        assert cfg.model.tokens.weights.endswith("/model_final.pth")
        levels = (
            ["p3", "p4", "p5", "p6", "p7"] if "fcos" in path else ["p2", "p3", "p4", "p5", "p6"]
        )
        cfg.model.tokens = L(build_level_tokens)(
            channels={lv: 256 for lv in levels}, num_tokens=6, weighted=True
        )
    model = instantiate(cfg.model)
    assert isinstance(model, (MasKD, MasKDTokenLearner))
    # the data's channel order is the one the model was built for (train_net checks it too)
    assert model.input_format == cfg.dataloader.train.mapper.image_format


# Heterogeneous pairs: teacher config, the teacher's published weights (detectron2's ViTDet
# project README; MODEL_ZOO.md "new baselines"), and what must be aligned: the teacher's channel
# order if it differs from the data's, whether the loss keeps to the image area (padding differs).
HETEROGENEOUS = {
    "maskd_vitdet_b-": (
        "Teachers/mask_rcnn_vitdet_b_100ep.py",
        "detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl",
        "RGB",
        True,
    ),
    "maskd_swin_b-": (
        "Teachers/cascade_mask_rcnn_swin_b_in21k_50ep.py",
        "detectron2://ViTDet/COCO/cascade_mask_rcnn_swin_b_in21k/f342979038/"
        "model_final_246a82.pkl",
        "RGB",
        True,
    ),
    "maskd_mask_rcnn_R_101_LSJ-": (
        "new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py",
        "detectron2://new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ/42073830/model_final_f96b26.pkl",
        None,
        False,
    ),
}


@pytest.mark.parametrize("prefix", sorted(HETEROGENEOUS))
def test_heterogeneous_pairs(prefix):
    config, weights, teacher_format, image_area_only = HETEROGENEOUS[prefix]
    base = os.path.join(ROOT, "COCO-Detection", prefix + "faster_rcnn_R_50_FPN")
    stage2 = LazyConfig.load(base + "_2x_coco.py")
    stage1 = LazyConfig.load(base + "_tokens_coco.py")
    expected = os.path.join(ROOT, config) if config.startswith("Teachers/") else config
    for cfg in (stage1, stage2):
        teacher = cfg.model.teacher
        assert os.path.realpath(resolve_config_file(teacher.config_file)) == os.path.realpath(
            resolve_config_file(expected)
        )
        assert teacher.weights == weights
    # stage 1 reads the tokens' levels from the teacher's own data; stage 2 reads stage 1's output
    assert stage2.model.tokens.weights == stage1.train.output_dir + "/model_final.pth"
    assert (stage1.train.max_iter, stage1.optimizer.lr, stage2.train.max_iter) == (
        2000,
        0.1,
        180000,
    )
    assert stage2.model.student.backbone.bottom_up.stages.depth == 50
    assert stage2.dataloader.train.mapper.image_format == "BGR"  # the student's data
    if image_area_only:  # a 1024 square: the training images must fit it
        crop = stage2.dataloader.train.mapper.augmentations[-1]
        assert tuple(crop.crop_size) == (1024, 1024) and crop.pad is False
    cfg = stage2
    cfg.model.teacher.weights = ""
    cfg.model.teacher.allow_random_init = True
    cfg.model.tokens = L(build_level_tokens)(
        channels={lv: 256 for lv in ["p2", "p3", "p4", "p5", "p6"]}, num_tokens=6, weighted=True
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.teacher_format == teacher_format
    assert model.image_area_only == image_area_only
    assert model.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert not model.inherited


@pytest.mark.parametrize(
    "name", ["mask_rcnn_vitdet_b_100ep", "cascade_mask_rcnn_swin_b_in21k_50ep"]
)
def test_teacher_configs_build(name):
    cfg = LazyConfig.load(os.path.join(ROOT, "Teachers", name + ".py"))
    assert cfg.train.init_checkpoint.startswith(
        "detectron2://ViTDet/COCO/" + name.rsplit("_", 1)[0]
    )
    assert cfg.model.input_format == cfg.dataloader.train.mapper.image_format == "RGB"
    model = instantiate(cfg.model)
    shapes = model.backbone.output_shape()
    assert {lv: s.stride for lv, s in shapes.items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    assert model.backbone.padding_constraints["square_size"] == 1024


# The paper's official detection settings (docs/method.md, "The paper's settings and numbers"), written from the
# paper's table, keyed by what a config describes (student meta-architecture, teacher config),
# not by file name: loss weight, warm-up K, head-level KD (config node, loss, weight), inherit.
PAPER = {
    # Faster R-CNN R50 <- Faster R-CNN R101: SmoothL1 on RoI box regression, w=1; 41.0 with
    # inheriting (40.8 without)
    ("GeneralizedRCNN", "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"): (
        1,
        7330,
        ("ROI_REG_KD", "smooth_l1", 1),
        True,
    ),
    # RetinaNet R50 <- RetinaNet R101: L1 on box regression, w=1; neck and head inherited
    ("RetinaNet", "COCO-Detection/retinanet_R_101_FPN_3x.yaml"): (
        7,
        7000,
        ("DENSE_REG_KD", "l1", 1),
        True,
    ),
    # Faster R-CNN R50 <- a stronger Cascade Mask R-CNN teacher (the paper's X101 is not in
    # detectron2's zoo; its strongest Cascade Mask R-CNN with FPN levels is the X152):
    # SmoothL1 on RoI box regression, no inheriting named
    ("GeneralizedRCNN", "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml"): (
        1,
        5000,
        ("ROI_REG_KD", "smooth_l1", 1),
        False,
    ),
}
# Rows of the project that take a paper row's settings with another teacher: the stronger-teacher
# row with a two-stage X101 teacher that needs no compiled ops (the X152 uses deformable conv).
OTHER_ROWS = {
    ("GeneralizedRCNN", "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml"): (
        1,
        5000,
        ("ROI_REG_KD", "smooth_l1", 1),
        False,
    ),
}
# Ablations of the project, stated as changes to a paper row.
ABLATIONS = {"maskd-featonly_": {"head": None, "inherit": False}}
# The FCOS row (loss weight 10, warm-up 5000, no head KD), for the LazyConfig FCOS student.
FCOS_ROW = (10, 5000, None, False)


def _head_kd(m):
    """(node, loss, weight) of the enabled head-level KD term of a MODEL.MASKD node, or None."""
    on = [k for k in ("ROI_REG_KD", "DENSE_REG_KD") if m[k].WEIGHT > 0]
    assert len(on) <= 1, on
    if not on:
        return None
    node = m[on[0]]
    loss = node.LOSS if "LOSS" in node else ("smooth_l1" if node.BETA > 0 else "l1")
    return (on[0], loss, node.WEIGHT)


STAGE2 = [p for p in YAML if "_tokens_" not in os.path.basename(p)]


@pytest.mark.parametrize("path", STAGE2, ids=_name)
def test_stage2_configs_follow_the_paper(path):
    cfg = get_maskd_cfg()
    cfg.merge_from_file(path)
    m = cfg.MODEL.MASKD
    key = (m.STUDENT_META_ARCHITECTURE, m.TEACHER.CONFIG_FILE)
    got = (m.LOSS_WEIGHT, m.CUSTOM_MASK_WARMUP, _head_kd(m), m.INHERIT)
    rows = {**PAPER, **OTHER_ROWS}
    if key not in rows:  # a pair the paper has no detection row for: the method's defaults
        assert "segmentation" in path.lower() or "semantic" in path.lower(), key
        return
    loss_weight, warmup, head, inherit = rows[key]
    for prefix, change in ABLATIONS.items():
        if os.path.basename(path).startswith(prefix):
            head, inherit = change["head"], change["inherit"]
    assert got == (loss_weight, warmup, head, inherit)
    assert cfg.SOLVER.MAX_ITER == 180000 and cfg.SOLVER.IMS_PER_BATCH == 16  # 2x, 8 GPUs x 2


def test_every_paper_row_has_a_config():
    described = set()
    for path in STAGE2:
        cfg = get_maskd_cfg()
        cfg.merge_from_file(path)
        described.add(
            (cfg.MODEL.MASKD.STUDENT_META_ARCHITECTURE, cfg.MODEL.MASKD.TEACHER.CONFIG_FILE)
        )
    assert set(PAPER) <= described


TOKENS = [p for p in YAML if "_tokens_" in os.path.basename(p)]


@pytest.mark.parametrize("path", TOKENS, ids=_name)
def test_stage1_configs_follow_the_official_token_schedule(path):
    # docs/method.md: 2000 iterations, cosine decay to 1e-6, Adam lr 0.01 wd 1e-3 for most
    # detectors, SGD lr 0.1 for the Faster R-CNN R101 teacher; T = 6 with weights (detection),
    # Dice weight 1.
    cfg = get_maskd_cfg()
    cfg.merge_from_file(path)
    s, m = cfg.SOLVER, cfg.MODEL.MASKD
    assert (s.MAX_ITER, s.LR_SCHEDULER_NAME, s.BASE_LR_END) == (2000, "WarmupCosineLR", 1e-6)
    if m.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml":
        assert (s.OPTIMIZER, s.BASE_LR) == ("SGD", 0.1)
    else:
        assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY) == ("ADAM", 0.01, 1e-3)
    assert m.DICE_WEIGHT == 1.0
    if "semantic" not in path.lower():
        assert (m.NUM_TOKENS, m.WEIGHTED) == (6, True)


def test_fcos_lazy_config_follows_the_paper():
    model = LazyConfig.load(
        os.path.join(ROOT, "COCO-Detection/maskd_retinanet_R_101-fcos_R_50_FPN_2x_coco.py")
    ).model
    loss_weight, warmup, head, inherit = FCOS_ROW
    assert (model.loss_weight, model.custom_mask_warmup) == (loss_weight, warmup)
    assert head is None and not model.get("head_kd") and model.get("inherit", False) == inherit


def test_one_loader_for_both_config_systems(tmp_path):
    from detectron2.config import CfgNode
    from tiny import tiny_fcos

    from maskd.config import is_lazy_config, load_config

    yacs = os.path.join(
        ROOT, "COCO-Detection", "maskd_retinanet_R_101-retinanet_R_50_FPN_2x_coco.yaml"
    )
    cfg = load_config(yacs, ["MODEL.MASKD.LOSS_WEIGHT", "3.0"])
    assert isinstance(cfg, CfgNode) and cfg.MODEL.MASKD.LOSS_WEIGHT == 3.0
    assert not is_lazy_config(yacs)
    lazy = os.path.join(ROOT, "COCO-Detection", "maskd_retinanet_R_101-fcos_R_50_FPN_2x_coco.py")
    cfg = load_config(lazy, ["model.loss_weight=3.0"])
    assert cfg.model.loss_weight == 3.0 and is_lazy_config(lazy)
    # a LazyConfig saved as .yaml (what an export writes), with python tags in it
    saved = LazyConfig.load(lazy)
    saved.model = tiny_fcos()
    LazyConfig.save(saved, str(tmp_path / "saved.yaml"))
    assert "!!python" in (tmp_path / "saved.yaml").read_text()
    assert is_lazy_config(str(tmp_path / "saved.yaml"))
    assert load_config(str(tmp_path / "saved.yaml")).model.num_classes == 3
    with pytest.raises(FileNotFoundError, match="config file not found: 'nope.yaml'"):
        load_config("nope.yaml")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, True, "1", None])
def test_a_config_number_is_finite_and_positive_or_zero_where_zero_is_off(value):
    check_number(0.0, "W", zero_allowed=True)
    check_number(2, "W", zero_allowed=True)
    check_number(1e-4, "LR", zero_allowed=False)
    with pytest.raises(ValueError, match="LR must be a finite positive number for training, got 0"):
        check_number(0, "LR", zero_allowed=False)
    for zero_allowed in (True, False):
        with pytest.raises(ValueError, match="K must be a finite"):
            check_number(value, "K", zero_allowed=zero_allowed)


def test_a_config_share_lies_in_0_1():
    assert check_fraction(0, "S") == 0.0 and check_fraction(1, "S") == 1.0
    for value in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match=r"S must lie in \[0, 1\], got"):
            check_fraction(value, "S")
