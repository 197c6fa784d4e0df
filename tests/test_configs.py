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
YAML = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))
LAZY = sorted(glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True))
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
    assert len(YAML) == 12 and len(LAZY) == 4  # FCOS exists in detectron2 as LazyConfig only
    for path in YAML + LAZY:
        name = os.path.basename(path)
        assert name.startswith("maskd_") and ("_tokens_" in name or "_2x_" in name), name


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
        tokens_cfg = path.replace("_2x_coco", "_tokens_coco")
        assert os.path.isfile(tokens_cfg), "every stage-2 config has its stage-1 config"
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
