"""Stage 1's opt-in mask-area prior (MODEL.MASKD.AREA_WEIGHT) and the selection probe
(tools/probe_selection.py): values against independent computations, where gradients go."""

import json

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import ROOT, maskd_cfg, run, tiny_batch, write_coco_dataset, write_teacher

from maskd.modeling.losses import combined_mask, masked_aggregate
from maskd.modeling.teacher import preprocess_images


def stage1(tmp_path, area_weight):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.AREA_WEIGHT = area_weight
    torch.manual_seed(0)
    return build_model(cfg)


def test_combined_mask_and_aggregate_against_einsum():
    g = torch.Generator().manual_seed(0)
    masks, weights = torch.rand(2, 3, 5, 4, generator=g), torch.rand(2, 3, generator=g)
    x = torch.randn(2, 7, 5, 4, generator=g)
    want = torch.einsum("nthw,nt->nhw", masks, weights)
    torch.testing.assert_close(combined_mask(masks, weights), want)
    torch.testing.assert_close(combined_mask(masks), masks.sum(1))
    ref = torch.einsum("nthw,nt,nchw->nchw", masks, weights, x)
    torch.testing.assert_close(masked_aggregate(x, masks, weights), ref)
    torch.testing.assert_close(masked_aggregate(x, masks, weights, want), ref)


def test_the_area_prior_is_off_by_default_and_refuses_negative_weights(tmp_path):
    model = stage1(tmp_path, 0.0)
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, 64, seed=0))
    assert "loss_area" not in losses and "loss_dice" in losses
    with pytest.raises(ValueError, match="AREA_WEIGHT must be a finite number >= 0"):
        stage1(tmp_path, -1.0)


def test_the_area_prior_value_and_gradient(tmp_path):
    """loss_area = weight * sum over levels of the mean combined mask of the teacher's
    features, and its gradient reaches the tokens and weight heads only."""
    weight = 2.5
    model = stage1(tmp_path, weight)
    model.train()
    batch = tiny_batch(2, 64, seed=1, empty=(1,))
    with EventStorage(0):
        losses = model(batch)
    with torch.no_grad():
        images = preprocess_images(model.teacher, batch)
        feats = model.teacher.backbone.inner(images.tensor)
    want = 0.0
    for lv, rt in model.tokens.items():
        m = torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, feats[lv]))
        want = want + torch.einsum("nthw,nt->nhw", m, rt.weights(feats[lv])).mean()
    torch.testing.assert_close(losses["loss_area"], weight * want)
    model.zero_grad(set_to_none=True)
    losses["loss_area"].backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert reached and all(n.startswith("teacher.backbone.tokens.") for n in reached)
    assert any(".weight_head." in n for n in reached) and any(
        n.endswith(".tokens") for n in reached
    )


@pytest.mark.slow
def test_probe_selection_measures_the_teachers_loss_under_fixed_masks(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    json_file, image_dir = write_coco_dataset(str(tmp_path / "data"), n_images=4)
    out = tmp_path / "probe.json"
    args = [f"{ROOT}/tools/probe_selection.py", "--config-file", teacher_config]
    args += ["--weights", teacher_weights, "--dataset", "probe_val", "--num", "4", "--batch", "2"]
    args += ["--register-coco", "probe_val", json_file, image_dir, "--output", str(out)]
    proc = run(args, tmp_path)
    assert "offset" in proc.stdout and "boxes, background 0" in proc.stdout
    result = json.loads(out.read_text())
    assert result["images"] == 4 and set(result["offset"]) == {"p2", "p3", "p4", "p5", "p6"}
    losses = result["losses"]
    assert set(losses) == {
        "ones (plain teacher)",
        "boxes, background 0",
        "boxes, background 0.5",
        "0.5 everywhere",
    }
    totals = [row["total"] for row in losses.values()]
    assert len(set(totals)) == 4  # the masks change what the teacher's heads see
    for row in losses.values():
        assert row["total"] == pytest.approx(sum(v for k, v in row.items() if k != "total"))
