"""The software stack is the pinned one and works: detectron2 and torch at the versions of the
requirements files, maskd from this checkout with its models registered, and a tiny detectron2
model trains a step."""

import math
import os
import re

import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import EventStorage
from tiny import ROOT, tiny_batch, tiny_rcnn_cfg

import maskd


def _pins():
    pins = {}
    for name in ("requirements.txt", "requirements-detectron2.txt"):
        with open(os.path.join(ROOT, name)) as f:
            for line in f:
                m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
                if m:
                    pins[m.group(1).lower()] = m.group(2)
    return pins


def test_the_installed_stack_is_the_pinned_one():
    import detectron2
    import torchvision

    pins = _pins()
    assert detectron2.__version__ == pins["sal-detectron2"]
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def test_maskd_is_this_checkout_and_registers_its_models():
    here = os.path.join(ROOT, "projects", "MasKD", "maskd", "__init__.py")
    assert os.path.samefile(maskd.__file__, here)
    assert META_ARCH_REGISTRY.get("MasKD") is maskd.MasKD
    assert META_ARCH_REGISTRY.get("MasKDTokenLearner") is maskd.MasKDTokenLearner
    # keyed by the config node each term reads
    assert {name for name, _ in maskd.HEAD_KD_REGISTRY} == {"ROI_REG_KD", "DENSE_REG_KD"}


def test_tiny_faster_rcnn_trains_one_step():
    torch.manual_seed(0)
    model = build_model(tiny_rcnn_cfg())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with EventStorage(0):
        losses = model(tiny_batch(n=2, size=64))
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    for name, value in losses.items():
        assert math.isfinite(value.item()), name


def test_the_public_names_stay_where_users_import_them():
    """What users import from the package (README, docs, shipped LazyConfigs), whatever the
    module layout behind it."""
    from maskd import (  # noqa: F401
        HEAD_KD_REGISTRY,
        MASK_SOURCE_REGISTRY,
        DenseRegressionKD,
        HeadKD,
        MasKD,
        MasKDCheckpointer,
        MasKDTokenLearner,
        MaskSource,
        ReceptiveTokens,
        RoIRegressionKD,
        add_maskd_config,
        build_teacher,
        dice_diversity_loss,
        get_maskd_cfg,
        load_config,
        load_tokens,
        masked_aggregate,
        masked_distillation_loss,
        model_zoo,
        tokens_from_file,
    )
    from maskd.checkpoint import load_weights_strict, read_checkpoint  # noqa: F401
    from maskd.config import is_lazy_config, resolve_config_file  # noqa: F401
    from maskd.modeling.mask_sources import LevelContext  # noqa: F401

    assert model_zoo.get_config_file("Demo/shapes_teacher_R34.yaml").endswith(".yaml")
    assert set(maskd.__all__) >= {"MasKD", "MasKDTokenLearner", "build_teacher", "model_zoo"}
