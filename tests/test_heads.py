"""Head-level distillation terms (maskd.modeling.head_kd) and inheriting on tiny CPU models: values
against independent computations, where their gradients go, and the registry through which a
new term plugs in."""

import math

import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from tiny import (
    STUDENT_DEPTH,
    STUDENT_FPN,
    TEACHER_DEPTH,
    TEACHER_FPN,
    calibrate_bn,
    maskd_cfg,
    tiny_batch,
    tiny_fcos,
    write_teacher,
)

from maskd import MasKD
from maskd.config import get_maskd_cfg
from maskd.modeling.head_kd import (
    HEAD_KD_REGISTRY,
    DenseRegressionKD,
    HeadKD,
    dense_regression_kd_loss,
)
from maskd.modeling.head_kd.roi_regression import roi_regression_kd_loss
from maskd.modeling.receptive_tokens import build_level_tokens
from maskd.modeling.teacher import preprocess_images
from maskd.modeling.wrappers import TransparentModule

GN = ["MODEL.RESNETS.NORM", "GN"]  # no batch statistics: a student can equal its teacher


def stage2(tmp_path, kind, teacher_kind=None, teacher_opts=(), student_like_teacher=False, **kd):
    teacher_config, teacher_weights, teacher = write_teacher(
        tmp_path, teacher_kind or kind, opts=teacher_opts
    )
    cfg = maskd_cfg("MasKD", kind, teacher_config, teacher_weights)
    if student_like_teacher:
        cfg.merge_from_file(teacher_config)  # the very same architecture
        cfg.MODEL.META_ARCHITECTURE = "MasKD"
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.merge_from_list([x for k, v in kd.items() for x in (f"MODEL.MASKD.{k}", str(v))])
    torch.manual_seed(1)
    return build_model(cfg), teacher


def head_term(model, key, needs=None, seed=0, gradient=True):
    """One training forward; the term, and the parameters its gradient reaches (those with a
    nonzero gradient). Fails if the gradient reaches nothing, unless ``gradient`` is False."""
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, 64, seed=seed, empty=(1,), **(needs or {})))
    assert key in losses and torch.isfinite(losses[key])
    model.zero_grad(set_to_none=True)
    losses[key].backward()
    reached = {  # named as in state dicts (the transparent wrappers' "inner" left out)
        n.replace(".inner.", ".")
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert reached or not gradient, f"{key} sends no gradient anywhere"
    return losses[key], reached


def test_roi_regression_kd(tmp_path):
    model, _ = stage2(tmp_path, "rcnn", **{"ROI_REG_KD.WEIGHT": 2.0})
    value, reached = head_term(model, "loss_roi_reg_kd")
    assert value > 0
    assert all(n.startswith("student.") for n in reached)
    # A box-regression term: the regression layer learns from it, the classifier does not.
    assert "student.roi_heads.box_predictor.bbox_pred.weight" in reached
    assert not any("cls_score" in n for n in reached)
    # Only the teacher's box head runs: its RPN never does.
    model.teacher.proposal_generator.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    head_term(model, "loss_roi_reg_kd", seed=1)


def test_roi_regression_kd_weight_scales_the_term(tmp_path):
    values = {}
    for weight in (1.0, 3.0):
        model, _ = stage2(tmp_path, "rcnn", **{"ROI_REG_KD.WEIGHT": weight})
        values[weight], _ = head_term(model, "loss_roi_reg_kd")
    assert values[3.0].item() == pytest.approx(3 * values[1.0].item(), rel=1e-5)


def test_roi_regression_kd_is_smooth_l1_with_its_beta(tmp_path):
    """Against SmoothL1 written out, with differences on both sides of beta = 0.5 (L1, or
    SmoothL1 with beta 1, give other values)."""
    _, teacher = stage2(tmp_path, "rcnn")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        feats = teacher.backbone(image)
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(
        torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 20.0, 60.0, 50.0]])
    )
    proposals.gt_classes = torch.tensor([0, 2])
    roi = teacher.roi_heads
    with torch.no_grad():
        pooled = roi.box_pooler([feats[f] for f in roi.box_in_features], [proposals.proposal_boxes])
        _, teacher_deltas = roi.box_predictor(roi.box_head(pooled))
    offsets = torch.tensor([0.1, -0.3, 2.0, -1.5]).repeat(2, teacher_deltas.shape[1] // 4)
    beta = 0.5
    value = roi_regression_kd_loss(teacher, feats, teacher_deltas + offsets, [proposals], beta)
    a = offsets.abs()
    smooth = torch.where(a < beta, 0.5 * a.square() / beta, a - 0.5 * beta)
    torch.testing.assert_close(value, smooth.sum() / 2, rtol=1e-5, atol=1e-5)
    assert not math.isclose(value.item(), a.sum().item() / 2, rel_tol=1e-3)  # not L1


@pytest.mark.parametrize(
    "teacher_kind,teacher_opts,student_opts",
    [
        ("cascade", (), ()),  # class-agnostic first cascade stage -> class-specific student
        ("rcnn", (), ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True")),
    ],
)
def test_roi_regression_kd_mixed_class_specificity(
    tmp_path, teacher_kind, teacher_opts, student_opts
):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, teacher_kind, opts=teacher_opts)
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.MASKD.ROI_REG_KD.WEIGHT = 1.0
    cfg.merge_from_list(list(student_opts))
    model = build_model(cfg)
    _, reached = head_term(model, "loss_roi_reg_kd")
    assert all(n.startswith("student.") for n in reached)
    assert "student.roi_heads.box_predictor.bbox_pred.weight" in reached


def test_dense_regression_kd_loss_values():
    s = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 1)]
    near = [torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 1, 1), 0.5)]  # |d| < beta
    far = [torch.full((1, 4, 2, 2), -2.0), torch.full((1, 4, 1, 1), -2.0)]  # |d| > beta
    levels = ["p3", "p4"]
    assert dense_regression_kd_loss(s, near, levels, "l1").item() == pytest.approx(0.5)
    assert dense_regression_kd_loss(s, near, levels, "smooth_l1").item() == pytest.approx(0.125)
    assert dense_regression_kd_loss(s, far, levels, "l1").item() == pytest.approx(2.0)
    assert dense_regression_kd_loss(s, far, levels, "smooth_l1").item() == pytest.approx(1.5)
    beta = dense_regression_kd_loss(s, near, levels, "smooth_l1", beta=0.25).item()
    assert beta == pytest.approx(0.5 - 0.125)
    with pytest.raises(ValueError, match="level 'p4'"):
        dense_regression_kd_loss(s, [near[0], torch.zeros(1, 8, 1, 1)], levels)
    with pytest.raises(ValueError, match="'l1' or 'smooth_l1', got 'l2'"):
        dense_regression_kd_loss(s, near, levels, "l2")


@pytest.mark.parametrize("loss", ["l1", "smooth_l1"])
def test_dense_regression_kd_retinanet_uses_the_configured_loss(tmp_path, loss):
    weight, beta = 2.0, 0.5
    model, teacher = stage2(
        tmp_path,
        "retinanet",
        **{"DENSE_REG_KD.WEIGHT": weight, "DENSE_REG_KD.LOSS": loss, "DENSE_REG_KD.BETA": beta},
    )
    recorded = {}
    read = model.student.head.recorded
    model.student.head.recorded = lambda key: recorded.setdefault(key, read(key))
    batch = tiny_batch(2, 64, seed=0, empty=(1,))
    value, reached = head_term(model, "loss_dense_reg_kd")
    assert all(n.startswith("student.") for n in reached)
    assert any(n.startswith("student.head.bbox_pred") for n in reached)
    assert not any(n.startswith("student.head.cls_score") for n in reached)
    # the expected value, computed here from the student's recorded outputs and the teacher
    with torch.no_grad():
        features = teacher.backbone(preprocess_images(teacher, batch).tensor)
        t_reg = teacher.head([features[lv] for lv in teacher.head_in_features])[1]
    s_reg = [r.detach() for r in recorded["outputs"][1]]
    diff = torch.cat([(s - t).flatten() for s, t in zip(s_reg, t_reg)]).abs()
    per = diff if loss == "l1" else torch.where(diff < beta, 0.5 * diff**2 / beta, diff - beta / 2)
    assert value.item() == pytest.approx(weight * per.mean().item(), rel=1e-5)


def test_dense_regression_kd_fcos_lazyconfig(tmp_path):
    torch.manual_seed(0)
    node = tiny_fcos(TEACHER_DEPTH, TEACHER_FPN, "BN")
    teacher = instantiate(node)
    calibrate_bn(teacher)
    loaded = instantiate(node)
    loaded.load_state_dict(teacher.state_dict())
    channels = {lv: s.channels for lv, s in loaded.backbone.output_shape().items()}
    model = MasKD(
        student=instantiate(tiny_fcos(STUDENT_DEPTH, STUDENT_FPN, "GN")),
        teacher=loaded,
        tokens=build_level_tokens(channels, 3, True),
        head_kd=[DenseRegressionKD(weight=1.0, loss="smooth_l1")],
    )
    value, reached = head_term(model, "loss_dense_reg_kd")
    assert value > 0 and all(n.startswith("student.") for n in reached)
    assert any(n.startswith("student.head.") for n in reached)


def test_head_terms_vanish_when_the_student_is_the_teacher(tmp_path):
    for kind, key, kd in [
        ("rcnn", "loss_roi_reg_kd", {"ROI_REG_KD.WEIGHT": 1.0}),
        ("retinanet", "loss_dense_reg_kd", {"DENSE_REG_KD.WEIGHT": 1.0}),
    ]:
        model, teacher = stage2(
            tmp_path, kind, teacher_opts=GN, student_like_teacher=True, INHERIT=True, **kd
        )
        # Inheriting gave the neck and heads; the bottom-up backbone comes from the teacher too.
        model.student.backbone.inner.bottom_up.load_state_dict(
            teacher.backbone.bottom_up.state_dict()
        )
        value, reached = head_term(model, key, gradient=False)
        assert value.item() == pytest.approx(0.0, abs=1e-6), kind
        assert not reached, kind  # zero loss, zero gradient


def test_inheriting_copies_exactly_the_matching_tensors(tmp_path):
    # A teacher with 5 classes: its class-dependent predictor layers cannot be inherited.
    teacher_config, teacher_weights, teacher = write_teacher(
        tmp_path, "rcnn", opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"], name="t5"
    )
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.FPN.OUT_CHANNELS = TEACHER_FPN
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    torch.manual_seed(3)
    before = {k: v.clone() for k, v in build_model(cfg).student.state_dict().items()}
    cfg.MODEL.MASKD.INHERIT = True
    torch.manual_seed(3)
    model = build_model(cfg)
    after = model.student.state_dict()
    t_state = teacher.state_dict()
    assert model.inherited
    for key, value in after.items():
        if key in model.inherited:
            assert torch.equal(value, t_state[key]), key
            assert not key.startswith("backbone.bottom_up.")
        else:
            assert torch.equal(value, before[key]), key
            ok_shape = key in t_state and t_state[key].shape == value.shape
            assert (
                key.startswith("backbone.bottom_up.")
                or key in ("pixel_mean", "pixel_std")
                or not ok_shape
            ), key
    assert any(k.startswith("backbone.fpn_") for k in model.inherited)
    assert any(k.startswith("proposal_generator.") for k in model.inherited)
    assert "roi_heads.box_predictor.cls_score.weight" not in model.inherited
    assert "roi_heads.box_head.fc1.weight" in model.inherited


def test_head_kd_options_check_the_models(tmp_path):
    with pytest.raises(ValueError, match="ROI_REG_KD needs an R-CNN student"):
        stage2(tmp_path, "retinanet", teacher_kind="rcnn", **{"ROI_REG_KD.WEIGHT": 1.0})
    with pytest.raises(ValueError, match="DENSE_REG_KD needs RetinaNet/FCOS-style models"):
        stage2(tmp_path, "rcnn", **{"DENSE_REG_KD.WEIGHT": 1.0})


class _KeepOutput(TransparentModule):
    """A made-up recording wrapper, as a user writes one: it keeps its module's output."""

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.keep(out=out)
        return out


class _BoxFeatureNormKD(HeadKD):
    """A made-up term for the registry test: the mean square of the student's box-head
    features, read through its own recording wrapper (docs/extending.md)."""

    CONFIG_KEY = "TEST_NORM_KD"
    LOSS_NAME = "loss_test_norm_kd"

    @classmethod
    def add_config(cls, node):
        node.WEIGHT = 0.0

    @classmethod
    def from_config(cls, node):
        return {"weight": node.WEIGHT}

    def check(self, student, teacher):
        if not hasattr(student, "roi_heads"):
            raise ValueError("MODEL.MASKD.TEST_NORM_KD needs an R-CNN student")

    def wrap(self, student):
        student.roi_heads.box_head = _KeepOutput(student.roi_heads.box_head)

    def forward(self, student, teacher, teacher_features):
        return self.weight * student.roi_heads.box_head.recorded("out").pow(2).mean()


def test_a_new_head_term_is_one_class_and_one_registration(tmp_path):
    HEAD_KD_REGISTRY.register(_BoxFeatureNormKD)
    try:
        assert get_maskd_cfg().MODEL.MASKD.TEST_NORM_KD.WEIGHT == 0.0  # its keys, off
        model, _ = stage2(tmp_path, "rcnn")  # registered, but off by default
        assert "loss_test_norm_kd" not in [t.LOSS_NAME for t in model.head_kd]
        assert not isinstance(model.student.roi_heads.box_head, _KeepOutput)
        model, _ = stage2(tmp_path, "rcnn", **{"TEST_NORM_KD.WEIGHT": 0.5})
        (term,) = model.head_kd
        assert isinstance(term, _BoxFeatureNormKD)
        value, reached = head_term(model, "loss_test_norm_kd")
        assert value.item() > 0 and all(n.startswith("student.") for n in reached)
        assert any(n.startswith("student.roi_heads.box_head.") for n in reached)
        assert not any("box_predictor" in n for n in reached)  # it reads the box head's output
        # the wrapper is transparent in the student's state dict
        assert not any(".box_head.inner." in k for k in model.student.state_dict())
    finally:
        HEAD_KD_REGISTRY._obj_map.pop("TEST_NORM_KD")
    assert "TEST_NORM_KD" not in get_maskd_cfg().MODEL.MASKD


def test_a_term_registered_after_the_config_is_made_is_named_not_skipped(tmp_path):
    from maskd.modeling.head_kd import build_head_kd
    from maskd.utils.extensions import import_modules

    cfg = get_maskd_cfg()  # made before the registration
    HEAD_KD_REGISTRY.register(_BoxFeatureNormKD)
    try:
        with pytest.raises(
            KeyError, match=r"_BoxFeatureNormKD.*MODEL\.MASKD\.TEST_NORM_KD.*--import"
        ):
            build_head_kd(cfg.MODEL.MASKD)
        assert get_maskd_cfg().MODEL.MASKD.TEST_NORM_KD.WEIGHT == 0.0  # a new config has it
    finally:
        HEAD_KD_REGISTRY._obj_map.pop("TEST_NORM_KD")
    with pytest.raises(ModuleNotFoundError, match="--import no_such_module_of_mine: no module"):
        import_modules(["no_such_module_of_mine"])
    with pytest.raises(FileNotFoundError, match="--import .*missing.py: no such file"):
        import_modules([str(tmp_path / "missing.py")])
    (tmp_path / "mine.py").write_text("COUNT = [0]\nCOUNT[0] += 1\n")
    first = import_modules([str(tmp_path / "mine.py")])[0]
    again = import_modules([str(tmp_path / "mine.py")])[0]
    assert first is again and first.COUNT == [1]  # every process/stage may import it again


def test_a_module_that_fails_to_import_stops_the_command(tmp_path, monkeypatch):
    """A user's module that raises (a syntax error, a missing dependency) is never reported as
    imported: the error reaches the command line, which stops before any config is made, and
    the file is imported afresh once fixed."""
    import sys

    from maskd.cli.train import cli as train_cli
    from maskd.utils.extensions import import_modules

    broken = tmp_path / "broken_term.py"
    broken.write_text("def oops(:\n")
    with pytest.raises(SyntaxError):
        import_modules([str(broken)])
    (tmp_path / "needs_dep.py").write_text("import a_dependency_that_is_not_installed\n")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        import_modules([str(tmp_path / "needs_dep.py")])
    monkeypatch.syspath_prepend(str(tmp_path))  # the same module imported by name
    with pytest.raises(ModuleNotFoundError, match="'a_dependency_that_is_not_installed'$"):
        import_modules(["needs_dep"])
    assert not any("needs_dep" in name or "broken_term" in name for name in sys.modules)
    # through train_net's command line: the import error, not a run
    with pytest.raises(SyntaxError):
        train_cli(["--import", str(broken), "--config-file", str(tmp_path / "never_read.yaml")])
    broken.write_text("FIXED = True\n")
    assert import_modules([str(broken)])[0].FIXED


def test_an_invalid_dense_kd_loss_fails_when_the_model_is_built(tmp_path):
    config, weights, _ = write_teacher(tmp_path, "retinanet")
    cfg = maskd_cfg("MasKD", "retinanet", config, weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.MASKD.DENSE_REG_KD.WEIGHT = 1.0
    cfg.MODEL.MASKD.DENSE_REG_KD.LOSS = "l2"
    with pytest.raises(ValueError, match="'l1' or 'smooth_l1', got 'l2'"):
        build_model(cfg)
