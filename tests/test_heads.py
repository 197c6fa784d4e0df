"""Head-level distillation terms and inheriting (issue 8) on tiny CPU models."""

import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import (
    NEEDS,
    STUDENT_DEPTH,
    STUDENT_FPN,
    TEACHER_DEPTH,
    TEACHER_FPN,
    calibrate_bn,
    maskd_cfg,
    tiny_batch,
    tiny_cfg,
    tiny_fcos,
    write_teacher,
)

from maskd import MasKD

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


def head_term(model, key, needs=None, seed=0):
    """One training forward; the term, and the parameters its gradient reaches."""
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, 64, seed=seed, empty=(1,), **(needs or {})))
    assert key in losses and torch.isfinite(losses[key])
    model.zero_grad(set_to_none=True)
    losses[key].backward()
    reached = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    return losses[key], reached


def test_roi_regression_kd(tmp_path):
    model, _ = stage2(tmp_path, "rcnn", **{"ROI_REG_KD.WEIGHT": 2.0})
    value, reached = head_term(model, "loss_roi_reg_kd")
    assert value > 0
    assert reached and all(n.startswith("student.") for n in reached)
    assert any("box_predictor" in n for n in reached)
    # Only the teacher's box head runs: its RPN never does.
    model.teacher.proposal_generator.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    head_term(model, "loss_roi_reg_kd", seed=1)


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
        value, _ = head_term(model, key)
        assert value.item() == pytest.approx(0.0, abs=1e-6), kind


def test_dense_regression_kd_retinanet(tmp_path):
    for loss in ("l1", "smooth_l1"):
        model, _ = stage2(
            tmp_path, "retinanet", **{"DENSE_REG_KD.WEIGHT": 1.0, "DENSE_REG_KD.LOSS": loss}
        )
        value, reached = head_term(model, "loss_dense_reg_kd")
        assert value > 0 and all(n.startswith("student.") for n in reached)
        assert any(n.startswith("student.head.") for n in reached)


def test_dense_regression_kd_fcos_lazyconfig(tmp_path):
    torch.manual_seed(0)
    node = tiny_fcos(TEACHER_DEPTH, TEACHER_FPN, "BN")
    teacher = instantiate(node)
    calibrate_bn(teacher)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    model = MasKD(
        student=instantiate(tiny_fcos(STUDENT_DEPTH, STUDENT_FPN, "GN")),
        teacher=instantiate(node),
        teacher_weights=str(tmp_path / "t.pth"),
        allow_random_tokens=True,
        dense_reg_kd_weight=1.0,
        dense_reg_kd_loss="smooth_l1",
    )
    value, reached = head_term(model, "loss_dense_reg_kd")
    assert value > 0 and all(n.startswith("student.") for n in reached)
    assert any(n.startswith("student.head.") for n in reached)


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
