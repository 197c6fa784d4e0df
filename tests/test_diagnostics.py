"""Token-quality diagnostics (the statistics of the masks, of the weighted tokens and of the
loss weight on the ground-truth cells), the retention of stage 1 and the selection probe
(tools/probe_selection.py: the teacher's loss under fixed masks)."""

import json
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import ROOT, maskd_cfg, run, tiny_batch, write_coco_dataset, write_teacher

from maskd.engine import evaluate_with_retention, retention
from maskd.modeling.diagnostics import (
    CONSTANT_STD,
    STAT_NAMES,
    foreground_cells,
    level_sizes,
    put_token_statistics,
    token_statistics,
)
from maskd.modeling.losses import dice_diversity_loss


def _spread(h=8, w=8):
    """A mask that is 1 on the left half and 0 on the right: std 0.5."""
    m = torch.zeros(h, w)
    m[:, : w // 2] = 1.0
    return m


def test_constant_masks_are_counted_and_spread_ones_are_not():
    n, t, h, w = 2, 4, 8, 8
    masks = torch.empty(n, t, h, w)
    masks[:, 0] = 0.999  # all on
    masks[:, 1] = 0.001  # all off
    masks[:, 2] = 0.5 + 0.4 * CONSTANT_STD * torch.randn(n, h, w).clamp(-1, 1)  # below the bar
    masks[:, 3] = _spread(h, w)  # picks half of the image
    stats = token_statistics(masks)
    assert stats["constant"].item() == pytest.approx(3 / 4)
    # A mask with a small spot (1 pixel of 64 on, std 0.124) is not constant either.
    spot = torch.zeros(1, 1, h, w)
    spot[0, 0, 3, 3] = 1.0
    assert token_statistics(spot)["constant"].item() == 0.0
    assert token_statistics(torch.full((1, 1, h, w), 0.7))["constant"].item() == 1.0


def test_coverage_dice_and_entropy_values():
    h, w = 6, 6
    left = _spread(h, w)
    masks = torch.stack([left, 1 - left, left])[None]  # (1, 3, H, W)
    stats = token_statistics(masks, torch.tensor([[1 / 3, 1 / 3, 1 / 3]]))
    assert stats["coverage"].item() == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    # Pairs: (0,1) disjoint -> 0, (0,2) identical -> 1, (1,2) -> 0: mean over 6 ordered pairs.
    assert stats["dice"].item() == pytest.approx(2 / 6, abs=1e-5)
    assert stats["weight_entropy"].item() == pytest.approx(1.0)
    one_hot = token_statistics(masks, torch.tensor([[1.0, 0.0, 0.0]]))
    assert one_hot["weight_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    half = token_statistics(masks, torch.tensor([[0.5, 0.5, 0.0]]))
    assert half["weight_entropy"].item() == pytest.approx(math.log(2) / math.log(3))
    assert "weight_entropy" not in token_statistics(masks)
    # Without padding, "dice" is the Dice diversity loss of stage 1.
    rnd = torch.rand(3, 5, 7, 9)
    assert token_statistics(rnd)["dice"].item() == pytest.approx(
        dice_diversity_loss(rnd).item(), rel=1e-5
    )
    assert token_statistics(torch.rand(0, 5, 7, 9)) == {}


def test_combined_mask_shows_a_switched_off_level():
    on_off = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])[None]  # token 0 on, token 1 off
    assert token_statistics(on_off, torch.tensor([[0.0, 1.0]]))["combined"].item() == 0.0
    assert token_statistics(on_off, torch.tensor([[1.0, 0.0]]))["combined"].item() == 1.0
    assert token_statistics(on_off, torch.tensor([[0.25, 0.75]]))["combined"].item() == 0.25
    assert token_statistics(on_off)["combined"].item() == 1.0  # unweighted: the sum
    assert token_statistics(2 * on_off)["combined"].item() == 2.0


def test_weighted_token_statistics_against_written_out_references():
    """tokens_eff = 1 / sum w^2, weighted_dice = Dice of pairs weighted by w_i w_j, and the
    share of the per-cell loss weight sum_t w_t M_t^2 / sum M_t on the boxes' cells, each
    computed with loops; a uniform mask gives the boxes their share of the cells."""
    g = torch.Generator().manual_seed(0)
    n, t, h, w = 3, 4, 5, 6
    masks = torch.rand(n, t, h, w, generator=g)
    weights = torch.rand(n, t, generator=g).softmax(dim=1)
    fg = (torch.rand(n, h, w, generator=g) < 0.3).float()
    fg[2] = 0  # an image without boxes is left out of gt_share
    stats = token_statistics(masks, weights, foreground=fg)
    eff, wdice, share, share_u = [], [], [], []
    for i in range(n):
        eff.append(1.0 / sum(weights[i, k].item() ** 2 for k in range(t)))
        num = den = 0.0
        for a in range(t):
            for b in range(t):
                if a != b:
                    ma, mb = masks[i, a].flatten(), masks[i, b].flatten()
                    d = 2 * (ma @ mb) / (ma @ ma + mb @ mb + 1e-6)
                    num += weights[i, a].item() * weights[i, b].item() * d.item()
                    den += weights[i, a].item() * weights[i, b].item()
        wdice.append(num / den)
        if fg[i].sum() > 0:
            cell = sum(weights[i, k] * masks[i, k].square() / masks[i, k].sum() for k in range(t))
            share.append(((cell * fg[i]).sum() / cell.sum()).item())
            share_u.append(fg[i].mean().item())
    assert stats["tokens_eff"].item() == pytest.approx(sum(eff) / n, rel=1e-5)
    assert stats["weighted_dice"].item() == pytest.approx(sum(wdice) / n, rel=1e-5)
    assert stats["gt_share"].item() == pytest.approx(sum(share) / 2, rel=1e-5)
    assert stats["gt_share_uniform"].item() == pytest.approx(sum(share_u) / 2, rel=1e-5)

    # one token with all the weight: one effective token, no weighted pair
    one_hot = token_statistics(masks, torch.eye(t)[:n], foreground=fg)
    assert one_hot["tokens_eff"].item() == pytest.approx(1.0)
    assert one_hot["weighted_dice"].item() == 0.0
    # unweighted tokens are averaged by the loss: T effective tokens, the plain Dice
    plain = token_statistics(masks, foreground=fg)
    assert plain["tokens_eff"].item() == pytest.approx(t)
    assert plain["weighted_dice"].item() == pytest.approx(plain["dice"].item(), rel=1e-5)
    # whole-map mimicking re-weights nothing; the oracle partition gives the boxes half
    ones = token_statistics(torch.ones(n, 1, h, w), foreground=fg)
    assert ones["gt_share"].item() == pytest.approx(ones["gt_share_uniform"].item())
    partition = torch.stack([fg, 1 - fg], dim=1)
    halves = token_statistics(partition, torch.full((n, 2), 0.5), foreground=fg)
    assert halves["gt_share"].item() == pytest.approx(0.5)
    assert halves["gt_share_uniform"].item() < 0.45
    # no box anywhere: no gt_share
    assert "gt_share" not in token_statistics(masks, weights, foreground=torch.zeros(n, h, w))


def test_padding_is_left_out():
    # Image 1 fills the batch; image 0 is 4x4 of 8x8, constant inside, different in the padding.
    masks = torch.zeros(2, 2, 8, 8)
    masks[0] = 0.2
    masks[0, :, 4:, :] = 1.0
    masks[0, :, :, 4:] = 1.0
    masks[1, 0] = 0.2
    masks[1, 1] = _spread()
    sizes = [(4, 4), (8, 8)]
    stats = token_statistics(masks, sizes=sizes)
    assert stats["constant"].item() == pytest.approx(3 / 4)
    assert stats["coverage"].item() == pytest.approx((0.2 + 0.2 + 0.2 + 0.5) / 4)
    assert stats["combined"].item() == pytest.approx((0.4 + 0.7) / 2)  # unweighted sums
    assert token_statistics(masks)["constant"].item() == pytest.approx(1 / 4)  # with padding
    assert level_sizes([(100, 60), (128, 128)], (128, 128), (16, 16)) == [(13, 8), (16, 16)]


def test_statistics_go_to_the_storage_with_the_metric_tag():
    masks = torch.rand(2, 3, 4, 4)
    with EventStorage() as storage:
        written = put_token_statistics(storage, {"p3": token_statistics(masks)})
        expected = ("coverage", "constant", "dice", "combined", "tokens_eff", "weighted_dice")
        assert set(written) == {f"[metric]tokens/p3/{k}" for k in expected}
        assert storage.history("[metric]tokens/p3/coverage").latest() == pytest.approx(
            masks.mean().item()
        )


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diag")
    teacher_config, teacher_weights, teacher = write_teacher(tmp, "rcnn")
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    return tmp, cfg, build_model(cfg), teacher


def test_both_stages_log_token_statistics_per_level(stage1):
    tmp, cfg, model, _ = stage1
    model.train()
    with EventStorage() as storage:
        model(tiny_batch(2, 64, seed=0))
        names = set(storage.histories())
    levels = model.in_features
    for lv in levels:
        for stat in STAT_NAMES:  # tiny_batch has boxes: gt_share too
            assert f"[metric]tokens/{lv}/{stat}" in names, (lv, stat)

    ckpt = tmp / "tokens.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    cfg2 = maskd_cfg(
        "MasKD", "rcnn", cfg.MODEL.MASKD.TEACHER.CONFIG_FILE, cfg.MODEL.MASKD.TEACHER.WEIGHTS
    )
    cfg2.MODEL.MASKD.TOKENS_WEIGHTS = str(ckpt)
    model2 = build_model(cfg2).train()
    batch = tiny_batch(2, 64, seed=3)
    with EventStorage() as storage:
        model2(batch)
        logged = {k: v.latest() for k, v in storage.histories().items() if "tokens/" in k}
    # Stage 2 logs the statistics of the frozen tokens on the teacher's features.
    with torch.no_grad():
        from maskd.modeling.teacher import preprocess_images

        feats = model2.teacher.backbone(preprocess_images(model2.teacher, batch).tensor)
    for lv in model2.in_features:
        rt = model2.tokens[lv]
        fg = foreground_cells(batch, model2.strides[lv], *feats[lv].shape[-2:])
        with torch.no_grad():
            expected = token_statistics(rt.masks(feats[lv]), rt.weights(feats[lv]), foreground=fg)
        assert "gt_share" in expected
        for stat, value in expected.items():
            assert logged[f"[metric]tokens/{lv}/{stat}"] == pytest.approx(value.item(), rel=1e-5)


def test_masks_disabled_gives_the_plain_teacher(stage1):
    _, _, model, teacher = stage1
    model.eval()
    teacher.eval()
    batch = tiny_batch(2, 64, seed=4)
    with torch.no_grad():
        masked = model(batch)
        with model.masks_disabled():
            plain = model(batch)
        again = model(batch)
        reference = teacher(batch)
    for a, b in zip(plain, reference):
        assert torch.equal(a["instances"].scores, b["instances"].scores)
    # The masks are back on afterwards, and they did change the predictions.
    for a, b in zip(masked, again):
        assert torch.equal(a["instances"].scores, b["instances"].scores)
    assert any(
        a["instances"].scores.shape != b["instances"].scores.shape
        or not torch.equal(a["instances"].scores, b["instances"].scores)
        for a, b in zip(masked, plain)
    )


def test_retention_from_two_evaluations(stage1):
    _, _, model, _ = stage1
    model.eval()
    calls = []

    def evaluate(teacher):
        # Stands for detectron2's evaluation; records which pass runs with masks on.
        calls.append((teacher, model.teacher.backbone.masking))
        ap = 40.0 if teacher else 30.0
        return {"bbox": {"AP": ap, "AP50": 50.0}, "segm": {"AP": 0.0}}

    results = evaluate_with_retention(model, evaluate)
    assert calls == [(False, True), (True, False)]  # the second pass runs without masks
    assert model.teacher.backbone.masking
    assert results["retention"]["bbox/AP"] == pytest.approx(0.75)
    assert math.isnan(results["retention"]["segm/AP"])
    assert results["teacher"]["bbox"]["AP"] == 40.0 and results["bbox"]["AP"] == 30.0

    # Several datasets; a model that is not a token learner is evaluated once.
    both = retention(
        {"a": {"bbox": {"AP": 5.0}}, "b": {"sem_seg": {"mIoU": 30.0, "fwIoU": 1.0}}},
        {"a": {"bbox": {"AP": 10.0}}, "b": {"sem_seg": {"mIoU": 60.0, "fwIoU": 2.0}}},
    )
    assert both == {"a/bbox/AP": 0.5, "b/sem_seg/mIoU": 0.5}
    calls.clear()
    assert "retention" not in evaluate_with_retention(model.teacher, evaluate)
    assert len(calls) == 1


def test_mask_grids_state_the_statistics_of_each_level(stage1, tmp_path):
    from maskd.modeling.teacher import preprocess_images
    from maskd.utils.visualize import format_statistics, mask_grid, receptive_masks

    _, _, model, _ = stage1
    model.eval()
    item = tiny_batch(1, 64, seed=6)[0]
    masks, stats = receptive_masks(model, item, with_statistics=True)
    with torch.no_grad():
        feats = model.teacher.backbone.inner(preprocess_images(model.teacher, [item]).tensor)
    assert list(stats) == model.in_features
    strides = {lv: s.stride for lv, s in model.teacher.backbone.output_shape().items()}
    for lv, rt in model.tokens.items():
        fg = foreground_cells([item], strides[lv], *feats[lv].shape[-2:])
        with torch.no_grad():
            expected = token_statistics(rt.masks(feats[lv]), rt.weights(feats[lv]), foreground=fg)
        assert stats[lv] == pytest.approx({k: v.item() for k, v in expected.items()}, rel=1e-5)
        assert "gt_share" in stats[lv]
    image = item["image"].permute(1, 2, 0).numpy()
    fig = mask_grid(image, masks, statistics=stats)
    labels = [ax.get_xlabel() for ax in fig.axes[:: 1 + model.tokens["p2"].num_tokens]]
    assert labels == [format_statistics(stats[lv]) for lv in model.in_features]
    assert f"const {stats['p3']['constant']:.2f}" in labels[1]
    assert f"H(w) {stats['p3']['weight_entropy']:.2f}" in labels[1]


def test_low_retention_warns_and_names_switched_off_levels():
    import logging

    from maskd import engine

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("maskd.engine")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        with EventStorage() as storage:
            storage.put_scalar("[metric]tokens/p2/combined", 0.98)
            storage.put_scalar("[metric]tokens/p4/combined", 0.01)
            engine.log_final_retention({"bbox/AP": 0.6}, storage)
            engine.log_final_retention({"bbox/AP": 0.99}, storage)
            engine.log_final_retention({}, storage)  # not stage 1: no retention, silent
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    low, good = (r.getMessage() for r in records)
    assert "bbox/AP = 0.600, below 0.95" in low and "p4 (0.01)" in low and "p2" not in low
    assert good == "MasKD stage 1 finished: retention (masked teacher / teacher) bbox/AP = 0.990"


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
