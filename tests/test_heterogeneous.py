"""Heterogeneous pairs: a ViT + SimpleFeaturePyramid teacher (RGB, ImageNet mean/std, 128 px
square padding, levels p3-p6) and R-FPN students (BGR, caffe mean, padding to multiples of 32,
levels p2-p6), through train_net.py and in process."""

import math

import pytest
import torch
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from tiny import (
    TRAIN_NET,
    finite_loss_records,
    maskd_cfg,
    run,
    tiny_training,
)

from maskd.modeling.pairing import image_area, pair_levels, parse_level_map

VIT_LEVELS = ["p3", "p4", "p5", "p6"]
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def write_vit_teacher(folder, square_pad=128, seed=0):
    """A ViTDet-style teacher as a user has it: a LazyConfig .py file and its checkpoint."""
    from tiny import tiny_vitdet

    config = folder / f"vit_teacher_{square_pad}.py"
    config.write_text(f"from tiny import tiny_vitdet\n\nmodel = tiny_vitdet({square_pad})\n")
    torch.manual_seed(seed)
    model = instantiate(tiny_vitdet(square_pad))
    weights = folder / f"vit_teacher_{square_pad}.pth"
    torch.save({"model": model.state_dict()}, weights)
    return str(config), str(weights)


# the names that the datasets fixture (conftest.py) gives this module's datasets
DATASETS = ("heterogeneous_train", "heterogeneous_val")


@pytest.fixture(scope="module")
def ws(datasets):
    tmp = datasets.tmp
    return {"tmp": tmp, "register": datasets.register, "teacher": write_vit_teacher(tmp)}


def _assert_teacher_unchanged(checkpoint_file, teacher_weights):
    saved = torch.load(checkpoint_file, map_location="cpu", weights_only=True)["model"]
    original = torch.load(teacher_weights, map_location="cpu", weights_only=True)["model"]
    for key, value in original.items():
        assert torch.equal(saved["teacher." + key], value), key


def _train_net(ws, cfg, name):
    """Run one stage through train_net.py; its log, and the loss records of its metrics.json
    (every loss finite)."""
    (ws["tmp"] / f"{name}.yaml").write_text(cfg.dump())
    out = run([TRAIN_NET, "--config-file", f"{name}.yaml", *ws["register"]], ws["tmp"])
    return out.stdout + out.stderr, finite_loss_records(cfg.OUTPUT_DIR)


@pytest.mark.slow
def test_vit_teacher_to_resnet_student_both_stages_through_train_net(ws):
    tmp = ws["tmp"]
    stage1 = tiny_training(
        maskd_cfg("MasKDTokenLearner", "rcnn", *ws["teacher"]), tmp / "s1", DATASETS
    )
    assert stage1.INPUT.FORMAT == "BGR"  # the student's data; the teacher reads RGB
    log, records = _train_net(ws, stage1, "stage1")
    assert "the BGR batch is converted to RGB for the teacher" in log
    assert all("loss_dice" in r for r in records)
    _assert_teacher_unchanged(tmp / "s1" / "model_final.pth", ws["teacher"][1])

    stage2 = tiny_training(
        maskd_cfg("MasKD", "rcnn", *ws["teacher"], str(tmp / "s1" / "model_final.pth")),
        tmp / "s2",
        DATASETS,
    )
    log, records = _train_net(ws, stage2, "stage2")
    assert "teacher input: converted BGR -> RGB, loss over the image area" in log
    for r in records:
        assert r["loss_maskd"] > 0
        # the levels both produce at the same stride: P2 is the student's only
        assert {f"maskd/loss_{lv}" for lv in VIT_LEVELS} <= set(r) and "maskd/loss_p2" not in r
    _assert_teacher_unchanged(tmp / "s2" / "model_final.pth", ws["teacher"][1])


def _batch(sizes, seed=0):
    """Images of the given (h, w), one box each, as the DatasetMapper gives them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, w / 2, h / 2]]))
        inst.gt_classes = torch.tensor([1])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        out.append({"image": image, "instances": inst, "height": h, "width": w})
    return out


def _stage2(ws, **opts):
    cfg = maskd_cfg("MasKD", "rcnn", *ws["teacher"])
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    for key, value in opts.items():
        setattr(cfg.MODEL.MASKD, key, value)
    torch.manual_seed(0)
    return build_model(cfg)


def _with_garbage(forward, sizes, inside=False):
    """A backbone forward whose features get large values over the padding (or, ``inside``,
    over the image area too)."""

    def wrapped(x):
        out = {}
        g = torch.Generator().manual_seed(1)
        for lv, f in forward(x).items():
            f = f.clone()
            stride = STRIDES[lv]
            for i, (h, w) in enumerate(sizes):
                noise = 1e3 * torch.randn(f.shape[1:], generator=g)
                hl, wl = math.ceil(h / stride), math.ceil(w / stride)
                keep = torch.zeros(f.shape[2:], dtype=torch.bool)
                keep[:hl, :wl] = True
                if inside:
                    keep[0, 0] = False
                f[i] = torch.where(keep, f[i], noise)
            out[lv] = f
        return out

    return wrapped


def _maskd_losses(model, batch):
    model.train()
    with EventStorage(0) as storage:
        losses = model(batch)
    per_level = {k: v for k, v in storage.latest().items() if k.startswith("maskd/loss_")}
    return losses["loss_maskd"].detach(), per_level


def test_padding_never_enters_the_loss_or_the_masks(ws):
    model = _stage2(ws)
    assert model.image_area_only  # square padding vs multiples of 32: forced on
    assert model.in_features == VIT_LEVELS and model.student_levels == {lv: lv for lv in VIT_LEVELS}
    sizes = [(50, 70), (64, 40)]  # teacher: 128 x 128; student: 64 x 96
    batch = _batch(sizes)
    reference, per_level = _maskd_losses(model, batch)
    assert reference > 0 and set(per_level) == {f"maskd/loss_{lv}" for lv in VIT_LEVELS}

    # Whatever the teacher's and the student's features hold over the padded area: the same
    # loss, to the bit (the masks are zero there and the token weights pool the image area).
    teacher_forward = model.teacher.backbone.forward
    student_inner = model.student.backbone.inner
    student_forward = student_inner.forward
    model.teacher.backbone.forward = _with_garbage(teacher_forward, sizes)
    student_inner.forward = _with_garbage(student_forward, sizes)
    assert torch.equal(_maskd_losses(model, batch)[0], reference)
    # The check can fail: the same over one cell of the image area changes the loss.
    model.teacher.backbone.forward = _with_garbage(teacher_forward, sizes, inside=True)
    assert not torch.equal(_maskd_losses(model, batch)[0], reference)


def test_image_area_cut_and_cells():
    teacher = torch.randn(2, 4, 16, 16)  # a 128 px square at stride 8
    student = torch.randn(2, 3, 8, 12)  # 64 x 96 at stride 8
    t, s, valid, sizes = image_area(teacher, student, [(50, 70), (64, 40)], stride=8)
    assert t.shape == (2, 4, 8, 12) and s.shape == (2, 3, 8, 12)
    assert sizes == [(7, 9), (8, 5)]
    assert valid.shape == (2, 1, 8, 12)
    assert valid[0, 0].sum() == 7 * 9 and valid[0, 0, :7, :9].all()
    assert valid[1, 0].sum() == 8 * 5 and valid[1, 0, :, :5].all()
    with pytest.raises(ValueError, match=r"130x70 pixels covers 17x9 cells at stride 8"):
        image_area(teacher, student, [(130, 70), (64, 40)], stride=8)


def test_image_larger_than_the_teachers_square_is_refused(ws):
    model = _stage2(ws)
    with pytest.raises(ValueError, match=r"160x64 pixels is larger than the 128x128 square"):
        _maskd_losses(model, _batch([(160, 64), (64, 64)]))


def test_homogeneous_pair_keeps_the_padded_batch(tmp_path):
    from tiny import write_teacher

    cfg = maskd_cfg("MasKD", "rcnn", *write_teacher(tmp_path, "rcnn")[:2])
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    model = build_model(cfg)
    assert not model.image_area_only and model.teacher_format is None
    cfg.MODEL.MASKD.IMAGE_AREA_ONLY = True  # asked for
    assert build_model(cfg).image_area_only


def test_levels_that_cannot_be_aligned_are_named_with_their_strides(ws):
    with pytest.raises(
        ValueError,
        match=r"teacher level 'p3' cannot be aligned with the student: the student's level 'p2' "
        r"has stride 4, the teacher's 'p3' stride 8 \(teacher levels \{p3: stride 8, p4: stride "
        r"16, p5: stride 32, p6: stride 64\}, student levels \{p2: stride 4, p3: stride 8",
    ):
        _stage2(ws, LEVEL_MAP=["p3:p2"])
    with pytest.raises(ValueError, match=r"names level 'p2', but the teacher offers only \['p3'"):
        _stage2(ws, IN_FEATURES=["p2"])


def test_pair_levels_rules():
    t = {lv: ShapeSpec(channels=8, stride=STRIDES[lv]) for lv in VIT_LEVELS}
    s = {f"res{i}": ShapeSpec(channels=4, stride=2**i) for i in (2, 3, 4, 5)}
    with pytest.raises(
        ValueError, match=r"no feature level of the teacher can be aligned.*LEVEL_MAP"
    ):
        pair_levels(t, s, VIT_LEVELS)
    mapping = parse_level_map(["p3:res3", " p4 : res4 "])
    assert pair_levels(t, s, VIT_LEVELS, mapping) == {"p3": "res3", "p4": "res4"}
    with pytest.raises(ValueError, match=r"maps 'p5' to 'res9', but the student has no level"):
        pair_levels(t, s, VIT_LEVELS, {"p5": "res9"})
    with pytest.raises(ValueError, match=r"expected 'TEACHER_LEVEL:STUDENT_LEVEL'"):
        parse_level_map(["p3-res3"])
    with pytest.raises(ValueError, match=r"names teacher level 'p3' twice"):
        parse_level_map(["p3:res3", "p3:res4"])


class _Renamed(Backbone):
    """An R-FPN whose levels are called s2..s6 instead of p2..p6."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"s" + k[1:]: v for k, v in self.inner(x).items()}

    def output_shape(self):
        return {"s" + k[1:]: v for k, v in self.inner.output_shape().items()}

    @property
    def size_divisibility(self):
        return self.inner.size_divisibility


@BACKBONE_REGISTRY.register()
def build_renamed_fpn_backbone_for_tests(cfg, input_shape):
    return _Renamed(build_resnet_fpn_backbone(cfg, input_shape))


def test_level_map_aligns_differently_named_levels(ws):
    cfg = maskd_cfg("MasKD", "rcnn", *ws["teacher"])
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.BACKBONE.NAME = "build_renamed_fpn_backbone_for_tests"
    cfg.MODEL.RPN.IN_FEATURES = ["s2", "s3", "s4", "s5", "s6"]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["s2", "s3", "s4", "s5"]
    with pytest.raises(ValueError, match="no feature level of the teacher can be aligned"):
        build_model(cfg)
    cfg.MODEL.MASKD.LEVEL_MAP = ["p3:s3", "p4:s4", "p5:s5"]
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.student_levels == {"p3": "s3", "p4": "s4", "p5": "s5"}
    assert model.align["p3"].in_channels == 16 and model.align["p3"].out_channels == 32
    loss, per_level = _maskd_losses(model, _batch([(64, 64), (64, 64)]))
    assert torch.isfinite(loss) and loss > 0
    assert set(per_level) == {"maskd/loss_p3", "maskd/loss_p4", "maskd/loss_p5"}
