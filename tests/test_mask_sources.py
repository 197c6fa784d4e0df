"""Mask sources of stage 2 (maskd.modeling.mask_sources): each source's masks and loss against an
independent reference, where the gradient goes (student-customised masks included), and the
registry through which a source plugs in; tiny CPU models."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import STUDENT_FPN, TEACHER_FPN, maskd_cfg, tiny_batch, write_teacher

from maskd.modeling.losses import masked_distillation_loss
from maskd.modeling.mask_sources import (
    MASK_SOURCE_REGISTRY,
    LevelContext,
    MaskSource,
    box_cells,
    build_mask_source,
    mask_source_class,
)
from maskd.modeling.receptive_tokens import build_level_tokens

SOURCES = ("tokens", "uniform", "gt_boxes", "random_tokens", "gt_partition", "gt_instances")


def build(tmp_path, source="tokens", warmup=-1, **opts):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.MASKD.MASK_SOURCE = source
    cfg.MODEL.MASKD.CUSTOM_MASK_WARMUP = warmup
    cfg.merge_from_list([x for k, v in opts.items() for x in (f"MODEL.MASKD.{k}", str(v))])
    torch.manual_seed(1)
    return build_model(cfg)


def features(model, n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {
        lv: torch.randn(n, STUDENT_FPN, size // st, size // st, generator=g)
        for lv, st in model.strides.items()
    }
    t = {
        lv: torch.randn(n, TEACHER_FPN, size // st, size // st, generator=g) + 0.5
        for lv, st in model.strides.items()
    }
    return s, t


def cells_reference(boxes, stride, height, width):
    """Cell (i, j) is marked if its pixel square overlaps a box with positive area: the
    interval test, cell by cell."""
    out = torch.zeros(height, width)
    for i in range(height):
        for j in range(width):
            for x0, y0, x1, y1 in boxes.tolist():
                if j * stride < x1 and (j + 1) * stride > x0 and i * stride < y1:
                    if (i + 1) * stride > y0 and x1 > x0 and y1 > y0:
                        out[i, j] = 1.0
    return out


# ----------------------------------------------------------------------------- the registry
def test_every_source_is_registered_and_unknown_names_are_refused():
    names = {cls.NAME for _, cls in MASK_SOURCE_REGISTRY}
    assert set(SOURCES) <= names
    # keyed by the name the config uses
    assert all(key == cls.NAME for key, cls in MASK_SOURCE_REGISTRY)
    with pytest.raises(KeyError, match=r"MASK_SOURCE = 'fitnet'.*registered.*uniform"):
        mask_source_class("fitnet")


def test_a_source_without_customised_masks_refuses_the_warmup(tmp_path):
    with pytest.raises(ValueError, match=r"'uniform' has no student-customised.*WARMUP"):
        build(tmp_path, "uniform", warmup=10)
    build(tmp_path, "uniform", warmup=-1)  # the ablation's setting


def test_a_source_of_ones_own_plugs_in(tmp_path):
    @MASK_SOURCE_REGISTRY.register()
    class CentreMasks(MaskSource):
        NAME = "test_centre"

        def forward(self, ctx):
            m = torch.zeros_like(ctx.teacher[:, :1])
            h, w = m.shape[-2:]
            m[..., : max(1, h // 2), : max(1, w // 2)] = 1.0  # the top-left quarter
            return m, None

    try:
        model = build(tmp_path, "test_centre")
        s, t = features(model)
        with EventStorage(0):
            got, kept, _ = model.distillation_losses(s, t)
        for lv in model.in_features:
            masks = kept[lv][0]
            h, w = masks.shape[-2:]
            assert masks.shape[1] == 1 and masks.sum() == 2 * max(1, h // 2) * max(1, w // 2)
            want = masked_distillation_loss(model.align[lv](s[lv]), t[lv], masks)
            torch.testing.assert_close(got[lv], want)
    finally:
        MASK_SOURCE_REGISTRY._obj_map.pop("test_centre")


# ----------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("image_area_only", [False, True])
def test_uniform_is_the_mean_squared_error_over_the_image_area(tmp_path, image_area_only):
    model = build(tmp_path, "uniform", IMAGE_AREA_ONLY=image_area_only)
    s, t = features(model)
    sizes = [(64, 64), (37, 50)] if image_area_only else [(64, 64), (64, 64)]
    with EventStorage(0):
        got, _, _ = model.distillation_losses(s, t, sizes, (64, 64))
    for lv, stride in model.strides.items():
        d2 = (model.align[lv](s[lv]) - t[lv]).square()  # (N, C, H, W)
        per_image = [
            d2[i, :, : math.ceil(h / stride), : math.ceil(w / stride)].mean()
            for i, (h, w) in enumerate(sizes)
        ]
        want = torch.stack(per_image).mean()
        if not image_area_only:
            assert torch.allclose(want, F.mse_loss(model.align[lv](s[lv]), t[lv]))
        torch.testing.assert_close(got[lv], want)


# ----------------------------------------------------------------------------- gt boxes
def test_box_cells_marks_exactly_the_cells_a_box_overlaps():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g) * 100
    wh = torch.rand(6, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes = torch.cat([boxes, torch.tensor([[8.0, 8.0, 16.0, 16.0], [30.0, 30.0, 30.0, 40.0]])])
    for stride in (4, 8, 16, 32, 64):
        h = w = math.ceil(128 / stride)
        torch.testing.assert_close(
            box_cells(boxes, stride, h, w), cells_reference(boxes, stride, h, w)
        )
    # a box on cell borders marks no neighbour; an empty box (zero width) marks nothing
    cells = box_cells(boxes[-2:], 8, 4, 4)
    assert cells.sum() == 1 and cells[1, 1] == 1
    assert box_cells(torch.zeros(0, 4), 8, 4, 4).sum() == 0


@pytest.mark.parametrize("background", [0.0, 0.25])
def test_gt_boxes_masks_and_loss(tmp_path, background):
    model = build(tmp_path, "gt_boxes", **{"GT_BOXES.BACKGROUND": background})
    batch = tiny_batch(3, 64, seed=3, empty=(1,))  # image 1 has no boxes
    s, t = features(model, n=3)
    with EventStorage(0):
        got, kept, _ = model.distillation_losses(s, t, [(64, 64)] * 3, (64, 64), batch)
    for lv, stride in model.strides.items():
        h, w = t[lv].shape[-2:]
        fg = torch.stack(
            [cells_reference(x["instances"].gt_boxes.tensor, stride, h, w) for x in batch]
        )[:, None]
        want_masks = fg + background * (1 - fg)
        torch.testing.assert_close(kept[lv][0], want_masks)
        assert kept[lv][0][1].max() == background  # the image without boxes
        aligned = model.align[lv](s[lv])
        d2 = (aligned - t[lv]).square().mean(1, keepdim=True)  # (N, 1, H, W)
        per_image = [
            (want_masks[i].square() * d2[i]).sum() / want_masks[i].sum().clamp_min(1e-38)
            for i in range(3)
        ]
        if background == 0:
            assert per_image[1] == 0
        torch.testing.assert_close(got[lv], torch.stack(per_image).mean())


def test_gt_boxes_background_never_covers_the_padding(tmp_path):
    """Over the image area only, the background value stops at each image's border: padding
    cells have mask 0, so they add nothing to loss_maskd (written out cell by cell)."""
    model = build(tmp_path, "gt_boxes", IMAGE_AREA_ONLY=True, **{"GT_BOXES.BACKGROUND": 0.25})
    batch = tiny_batch(2, 64, seed=3)
    s, t = features(model)
    sizes = [(64, 64), (37, 50)]
    with EventStorage(0):
        got, kept, level_sizes = model.distillation_losses(s, t, sizes, (64, 64), batch)
    for lv, stride in model.strides.items():
        masks = kept[lv][0]
        h, w = level_sizes[lv][1]
        assert masks[1, :, h:].sum() == 0 and masks[1, :, :, w:].sum() == 0
        assert masks[1, :, :h, :w].min() >= 0.25
        d2 = (model.align[lv](s[lv]) - t[lv]).square().mean(1)  # (N, H, W)
        per_image = []
        for i, (hi, wi) in enumerate(level_sizes[lv]):
            fg = cells_reference(batch[i]["instances"].gt_boxes.tensor, stride, hi, wi)
            m = fg + 0.25 * (1 - fg)  # the image area alone
            per_image.append((m.square() * d2[i, :hi, :wi]).sum() / m.sum())
        torch.testing.assert_close(got[lv], torch.stack(per_image).mean())


def test_gt_boxes_needs_the_ground_truth(tmp_path):
    model = build(tmp_path, "gt_boxes")
    s, t = features(model)
    batch = [{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}] * 2
    with EventStorage(0), pytest.raises(ValueError, match="'gt_boxes' needs the ground truth"):
        model.distillation_losses(s, t, [(64, 64)] * 2, (64, 64), batch)


def test_gt_boxes_background_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"GT_BOXES.BACKGROUND must lie in \[0, 1\]"):
        build(tmp_path, "gt_boxes", **{"GT_BOXES.BACKGROUND": 1.5})


# ----------------------------------------------------------------------------- gt partitions
def partition_reference(source, batch, stride, h, w, fg_weight):
    """Region masks and weights written out image by image: the boxes' cells (together, or
    box by box) and the rest, the nominal weights renormalised over the regions with cells."""
    all_masks, all_weights = [], []
    for x in batch:
        boxes = x["instances"].gt_boxes.tensor
        fg = cells_reference(boxes, stride, h, w)
        if source == "gt_partition":
            regions = [fg]
            nominal = [fg_weight]
        else:
            regions = [cells_reference(b[None], stride, h, w) for b in boxes]
            nominal = [fg_weight / max(1, len(boxes))] * len(boxes)
        regions.append(1.0 - fg)
        nominal.append(1.0 - fg_weight)
        kept = [wt if r.sum() > 0 else 0.0 for r, wt in zip(regions, nominal)]
        all_masks.append(regions)
        all_weights.append([wt / sum(kept) for wt in kept])
    t = max(len(r) for r in all_masks)
    masks = torch.zeros(len(batch), t, h, w)
    weights = torch.zeros(len(batch), t)
    for i, (regions, wts) in enumerate(zip(all_masks, all_weights)):
        # the background last, the boxes first, padding between them (instances only)
        for k, (r, wt) in enumerate(zip(regions[:-1], wts[:-1])):
            masks[i, k], weights[i, k] = r, wt
        masks[i, -1], weights[i, -1] = regions[-1], wts[-1]
    return masks, weights


@pytest.mark.parametrize("source", ["gt_partition", "gt_instances"])
@pytest.mark.parametrize("fg_weight", [0.5, 0.8])
def test_gt_partitions_weigh_each_region_by_its_weight_not_its_area(tmp_path, source, fg_weight):
    """The loss is sum over regions of weight x the region's mean squared difference,
    computed region by region (an image without boxes: the background's mean alone)."""
    key = "GT_PARTITION" if source == "gt_partition" else "GT_INSTANCES"
    model = build(tmp_path, source, **{f"{key}.FOREGROUND_WEIGHT": fg_weight})
    batch = tiny_batch(3, 64, seed=3, empty=(1,))  # image 1 has no boxes
    assert min(len(batch[i]["instances"]) for i in (0, 2)) >= 1
    s, t = features(model, n=3)
    with EventStorage(0):
        got, kept, _ = model.distillation_losses(s, t, [(64, 64)] * 3, (64, 64), batch)
    for lv, stride in model.strides.items():
        h, w = t[lv].shape[-2:]
        d2 = (model.align[lv](s[lv]) - t[lv]).square().mean(1)  # (N, H, W)
        per_image = []
        for i, x in enumerate(batch):
            boxes = x["instances"].gt_boxes.tensor
            fg = cells_reference(boxes, stride, h, w)
            regions = (
                [fg]
                if source == "gt_partition"
                else [cells_reference(b[None], stride, h, w) for b in boxes]
            )
            share = [fg_weight / max(1, len(regions))] * len(regions) + [1.0 - fg_weight]
            regions = regions + [1.0 - fg]
            terms = [(wt, d2[i][r > 0].mean()) for wt, r in zip(share, regions) if r.sum() > 0]
            per_image.append(sum(wt * v for wt, v in terms) / sum(wt for wt, _ in terms))
        torch.testing.assert_close(got[lv], torch.stack(per_image).mean())
        masks, weights = kept[lv]
        want_masks, want_weights = partition_reference(source, batch, stride, h, w, fg_weight)
        torch.testing.assert_close(masks, want_masks)
        torch.testing.assert_close(weights, want_weights)
        # the image without boxes: background only, over every cell
        assert weights[1, -1] == 1 and masks[1, -1].sum() == h * w
        torch.testing.assert_close(weights.sum(1), torch.ones(3))


def test_gt_partition_differs_from_uniform_where_the_objects_are_few_cells(tmp_path):
    """A negative control: with the error concentrated on the boxes' cells, the partition
    gives them half of the loss where uniform gives them their share of the cells."""
    model = build(tmp_path, "gt_partition")
    lv, stride = "p2", model.strides["p2"]
    batch = tiny_batch(1, 64, seed=3)
    s, t = features(model, n=1)
    h, w = t[lv].shape[-2:]
    fg = cells_reference(batch[0]["instances"].gt_boxes.tensor, stride, h, w)
    assert 0 < fg.mean() < 0.5
    with torch.no_grad():
        aligned = model.align[lv](s[lv])
    t_lv = aligned + fg  # a difference of 1 on the boxes' cells, 0 elsewhere
    ctx = LevelContext(lv, None, t_lv, stride, None, [(h, w)], batch)
    masks, weights = model.mask_source(ctx)
    got = masked_distillation_loss(aligned, t_lv, masks, weights)
    torch.testing.assert_close(got, torch.tensor(0.5))
    uniform = masked_distillation_loss(aligned, t_lv, torch.ones(1, 1, h, w))
    torch.testing.assert_close(uniform, fg.mean())


def test_gt_partition_weight_out_of_range_and_missing_ground_truth_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"GT_PARTITION.FOREGROUND_WEIGHT must lie in"):
        build(tmp_path, "gt_partition", **{"GT_PARTITION.FOREGROUND_WEIGHT": 1.5})
    with pytest.raises(ValueError, match=r"GT_INSTANCES.FOREGROUND_WEIGHT must lie in"):
        mask_source_class("gt_instances")(foreground_weight=float("nan"))
    model = build(tmp_path, "gt_instances")
    s, t = features(model)
    batch = [{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}] * 2
    with EventStorage(0), pytest.raises(ValueError, match="'gt_instances' needs the ground truth"):
        model.distillation_losses(s, t, [(64, 64)] * 2, (64, 64), batch)


@pytest.mark.parametrize("source", ["gt_partition", "gt_instances"])
def test_gt_partitions_over_the_image_area_leave_the_padding_out(tmp_path, source):
    model = build(tmp_path, source, IMAGE_AREA_ONLY=True)
    batch = tiny_batch(2, 64, seed=3)
    s, t = features(model)
    sizes = [(64, 64), (37, 50)]
    with EventStorage(0):
        _, kept, level_sizes = model.distillation_losses(s, t, sizes, (64, 64), batch)
    for lv in model.in_features:
        masks = kept[lv][0]
        h, w = level_sizes[lv][1]
        assert masks[1, :, h:].sum() == 0 and masks[1, :, :, w:].sum() == 0
        torch.testing.assert_close(masks[1].sum(0)[:h, :w].clamp_max(1), torch.ones(h, w))


# ----------------------------------------------------------------------------- random tokens
def test_random_tokens_are_untrained_seeded_and_saved(tmp_path):
    learned = build_level_tokens({"p2": TEACHER_FPN, "p3": TEACHER_FPN}, 4, True)
    with torch.no_grad():
        for rt in learned.values():
            rt.tokens.normal_(0, 1.0)  # "trained": far from the initial scale
    torch.manual_seed(5)
    a = build_mask_source("random_tokens", learned)
    torch.manual_seed(5)
    b = build_mask_source("random_tokens", learned)
    t = torch.randn(2, TEACHER_FPN, 8, 8) + 0.5
    for lv in learned:
        assert torch.equal(a.tokens[lv].tokens, b.tokens[lv].tokens)  # seeded
        assert not torch.equal(a.tokens[lv].tokens, learned[lv].tokens)
        assert a.tokens[lv].tokens.std() < 0.02  # the stage-1 initialisation, N(0, 0.01^2)
        masks, weights = a(LevelContext(lv, learned[lv], t, 4, None, [(8, 8)] * 2, []))
        assert 0.4 < masks.mean() < 0.6 and masks.std() < 0.1  # about 0.5 everywhere
        assert weights.shape == (2, 4)
    assert not any(p.requires_grad for p in a.parameters())
    model = build(tmp_path, "random_tokens")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("stage2")
    state = torch.load(tmp_path / "stage2.pth", weights_only=True)["model"]
    assert any(k.startswith("mask_source.tokens.") for k in state)


# ----------------------------------------------------------------------------- every source
def _gen(level):
    return torch.Generator().manual_seed(sum(map(ord, level)))


def source_tokens(model, source, lv):
    """The ReceptiveTokens whose masks a token source uses at level ``lv``."""
    return model.mask_source.tokens[lv] if source == "random_tokens" else model.tokens[lv]


def reference_masks(model, source, lv, s, t, batch):
    """The masks and weights a source should give, computed without the source."""
    h, w = t.shape[-2:]
    if source == "uniform":
        return torch.ones(t.shape[0], 1, h, w), None
    if source == "gt_boxes":
        fg = [
            cells_reference(x["instances"].gt_boxes.tensor, model.strides[lv], h, w) for x in batch
        ]
        return torch.stack(fg)[:, None], None
    if source in ("gt_partition", "gt_instances"):
        return partition_reference(source, batch, model.strides[lv], h, w, 0.5)
    rt = source_tokens(model, source, lv)
    return torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, t)), rt.weights(t)


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_value_and_gradient_against_a_detached_reference(tmp_path, source):
    """The loss equals masked_distillation_loss of the reference masks, and the gradient
    reaches the student only through the features: never through the masks, also the
    student-customised masks after the warm-up."""
    customisable = mask_source_class(source).CUSTOMISABLE
    model = build(tmp_path, source, warmup=2 if customisable else -1)
    with torch.no_grad():  # trained-size tokens: masks far from 0.5, with large gradients
        for lv in model.in_features:
            source_tokens(model, source, lv).tokens.normal_(0, 0.5, generator=_gen(lv))
    batch = tiny_batch(2, 64, seed=4)
    s, t = features(model)
    for it in (0, 5):  # before and after the warm-up
        s_leaf = {lv: v.clone().requires_grad_(True) for lv, v in s.items()}
        model.zero_grad(set_to_none=True)
        with EventStorage(it):
            got, _, _ = model.distillation_losses(s_leaf, t, [(64, 64)] * 2, (64, 64), batch)
        sum(got.values()).backward()
        ref_leaf = {lv: v.clone().requires_grad_(True) for lv, v in s.items()}
        want = {}
        for lv in model.in_features:
            masks, weights = reference_masks(model, source, lv, s[lv], t[lv], batch)
            aligned = F.conv2d(ref_leaf[lv], model.align[lv].weight, model.align[lv].bias)
            if customisable and it >= 2:
                rt = source_tokens(model, source, lv)
                student_side = torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, aligned))
                masks = masks * student_side.detach()
            want[lv] = masked_distillation_loss(aligned, t[lv], masks, weights)
            torch.testing.assert_close(got[lv], want[lv])
        grads = torch.autograd.grad(
            sum(want.values()),
            list(ref_leaf.values()) + [model.align[lv].weight for lv in model.in_features],
        )
        n = len(ref_leaf)
        for lv, g in zip(ref_leaf, grads[:n]):
            torch.testing.assert_close(s_leaf[lv].grad, g)
        for lv, g in zip(model.in_features, grads[n:]):
            torch.testing.assert_close(model.align[lv].weight.grad, g)


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_trains_through_the_model(tmp_path, source):
    """A training step of the whole stage-2 model: loss_maskd finite and positive, its token
    statistics logged, the teacher unchanged."""
    model = build(tmp_path, source)
    model.train()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with EventStorage(0) as storage:
        losses = model(tiny_batch(2, 64, seed=0, empty=(1,)))
        sum(losses.values()).backward()
        logged = storage.latest()
    assert torch.isfinite(losses["loss_maskd"]) and losses["loss_maskd"] > 0
    lv = model.in_features[0]
    assert f"[metric]tokens/{lv}/coverage" in logged
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- LazyConfig
def test_the_mask_source_is_a_lazyconfig_argument(tmp_path):
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from tiny import STUDENT_DEPTH, TEACHER_DEPTH, calibrate_bn, tiny_fcos

    from maskd import MasKD, build_teacher
    from maskd.modeling.mask_sources import GTBoxMasks

    torch.manual_seed(0)
    teacher = instantiate(tiny_fcos(depth=TEACHER_DEPTH, fpn_channels=TEACHER_FPN, norm="BN"))
    calibrate_bn(teacher)
    torch.save({"model": teacher.state_dict()}, tmp_path / "fcos_teacher.pth")
    (tmp_path / "fcos_teacher.py").write_text(
        "from tiny import tiny_fcos\n" f"model = tiny_fcos({TEACHER_DEPTH}, {TEACHER_FPN}, 'BN')\n"
    )
    levels = {lv: TEACHER_FPN for lv in ("p3", "p4", "p5", "p6", "p7")}
    node = L(MasKD)(
        student=tiny_fcos(depth=STUDENT_DEPTH, fpn_channels=STUDENT_FPN, norm="GN"),
        teacher=L(build_teacher)(
            config_file=str(tmp_path / "fcos_teacher.py"),
            weights=str(tmp_path / "fcos_teacher.pth"),
        ),
        tokens=L(build_level_tokens)(channels=levels, num_tokens=3, weighted=True),
        mask_source="uniform",
    )
    assert instantiate(node).mask_source.NAME == "uniform"
    node.mask_source = L(GTBoxMasks)(background=0.5)
    model = instantiate(node)
    assert model.mask_source.NAME == "gt_boxes" and model.mask_source.background == 0.5
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, 64, seed=0, empty=(1,)))
    assert torch.isfinite(losses["loss_maskd"]) and losses["loss_maskd"] > 0
