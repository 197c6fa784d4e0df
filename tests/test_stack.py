"""The software stack works: detectron2 and maskd import, a tiny detectron2 model trains a step."""

import math

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import tiny_batch, tiny_rcnn_cfg

import maskd


def test_imports():
    import detectron2

    assert detectron2.__version__
    assert maskd.__name__ == "maskd"


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
