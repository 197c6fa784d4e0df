"""Every config of the project loads and builds its model on CPU, without any weights."""

import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from maskd import MasKD, MasKDTokenLearner
from maskd.config import get_maskd_cfg
from maskd.teacher import resolve_config_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
YAML = sorted(
    glob.glob(os.path.join(ROOT, "COCO-*", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "Misc", "*.yaml"))
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


def _name(path):
    return os.path.relpath(path, ROOT)


def test_configs_exist():
    # 6 pairs x 2 stages + the feature-only ablation; FCOS exists in detectron2 as LazyConfig only
    assert len(YAML) == 13 and len(LAZY) == 4
    for path in YAML + LAZY:
        name = os.path.basename(path)
        assert name.startswith("maskd") and ("_tokens_" in name or "_2x_" in name), name


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
        assert cfg.MODEL.MASKD.TOKENS_WEIGHTS.endswith("_tokens_coco/model_final.pth")
        # Every stage-2 config reads the output of a stage-1 config beside it.
        tokens_name = cfg.MODEL.MASKD.TOKENS_WEIGHTS.split("/")[1]
        tokens_cfg = os.path.join(os.path.dirname(path), tokens_name + ".yaml")
        assert os.path.isfile(tokens_cfg), tokens_cfg
        stage1 = get_maskd_cfg()
        stage1.merge_from_file(tokens_cfg)
        assert cfg.MODEL.MASKD.TOKENS_WEIGHTS == os.path.join(stage1.OUTPUT_DIR, "model_final.pth")
        assert cfg.SOLVER.MAX_ITER == 180000  # 2x
    else:
        assert cfg.SOLVER.MAX_ITER == 2000 and cfg.MODEL.WEIGHTS == ""
    cfg.merge_from_list(NO_WEIGHTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MasKD if stage == "MasKD" else MasKDTokenLearner)


@pytest.mark.parametrize("path", LAZY, ids=_name)
def test_lazy_config_builds(path):
    cfg = LazyConfig.load(path)
    assert cfg.train.output_dir.startswith("output/")
    cfg.model.teacher_weights = ""
    cfg.model.allow_random_teacher = True
    if "tokens_weights" in cfg.model:
        cfg.model.tokens_weights = ""
        cfg.model.allow_random_tokens = True
    assert os.path.isfile(resolve_config_file(cfg.model.teacher.config_file))
    model = instantiate(cfg.model)
    assert isinstance(model, (MasKD, MasKDTokenLearner))


# The paper's detection settings (method.md): loss weight, warm-up, RoI KD weight,
# dense KD weight, inheriting.
OFFICIAL = {
    "COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml": (
        1,
        7330,
        1,
        0,
        True,
    ),
    "COCO-Detection/maskd-featonly_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco.yaml": (
        1,
        7330,
        0,
        0,
        False,
    ),
    "COCO-Detection/maskd_retinanet_R_101-retinanet_R_50_FPN_2x_coco.yaml": (7, 7000, 0, 1, True),
    "COCO-Detection/maskd_faster_rcnn_X_101_32x8d-faster_rcnn_R_50_FPN_2x_coco.yaml": (
        1,
        5000,
        1,
        0,
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_stage2_configs_follow_the_official_settings(name):
    cfg = get_maskd_cfg()
    cfg.merge_from_file(os.path.join(ROOT, name))
    m = cfg.MODEL.MASKD
    got = (
        m.LOSS_WEIGHT,
        m.CUSTOM_MASK_WARMUP,
        m.ROI_REG_KD.WEIGHT,
        m.DENSE_REG_KD.WEIGHT,
        m.INHERIT,
    )
    assert got == OFFICIAL[name]


def test_fcos_lazy_config_follows_the_official_settings():
    model = LazyConfig.load(
        os.path.join(ROOT, "COCO-Detection/maskd_retinanet_R_101-fcos_R_50_FPN_2x_coco.py")
    ).model
    assert (model.loss_weight, model.custom_mask_warmup) == (10.0, 5000)
    assert model.get("roi_reg_kd_weight", 0) == 0 and model.get("dense_reg_kd_weight", 0) == 0
