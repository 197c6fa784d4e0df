"""Both stages on tiny CPU models of every supported kind, and their invariants: a frozen,
bitwise unchanged teacher, tokens trained only in stage 1, losses that join detectron2's dict."""

import logging
import math
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
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

from maskd import MasKD, MasKDCheckpointer, MasKDTokenLearner, build_teacher, tokens_from_file
from maskd.modeling.losses import masked_distillation_loss
from maskd.modeling.wrappers import recording


# ----------------------------------------------------------------------------- helpers
def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


def train(model, optimizer, needs, steps=2, start_iter=0):
    """A few SGD steps as detectron2's SimpleTrainer does them; one image has no annotation."""
    model.train()
    all_losses = []
    with EventStorage(start_iter) as storage:
        for i in range(steps):
            batch = tiny_batch(2, 64, seed=i, empty=(1,), **needs)
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            # What DistributedDataParallel without find_unused_parameters needs.
            assert not missing, f"trainable parameters without gradient: {missing[:5]}"
            optimizer.step()
            all_losses.append({k: v.item() for k, v in losses.items()})
            storage.step()
    for losses in all_losses:
        for k, v in losses.items():
            assert math.isfinite(v), k
    return all_losses


def optimizer_param_ids(optimizer):
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def run_stage1(tmp_path, model, needs, cfg=None):
    teacher_state = {
        k: v.clone()
        for k, v in model.teacher.state_dict().items()
        if not k.startswith("backbone.tokens.")
    }
    tokens_before = snapshot(model.tokens)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("teacher.backbone.tokens.") for n in trainable)
    optimizer = build_optimizer(cfg or get_cfg(), model)
    assert optimizer_param_ids(optimizer) == {id(p) for p in model.tokens.parameters()}
    model.train()
    assert not model.teacher.training

    losses = train(model, optimizer, needs, steps=3)
    assert "loss_dice" in losses[0] and len(losses[0]) > 1  # + the teacher's task losses

    after = model.teacher.state_dict()
    changed = [k for k in teacher_state if not torch.equal(teacher_state[k], after[k])]
    assert not changed, f"teacher changed: {changed[:5]}"
    tokens_after = model.tokens.state_dict()
    assert any(not torch.equal(tokens_before[k], tokens_after[k]) for k in tokens_before)
    assert not any(m.training for m in model.teacher.modules())

    model.eval()  # an evaluation round: the teacher predicts on masked features
    with torch.no_grad():
        outputs = model(tiny_batch(1, 64, seed=5, **needs))
    assert len(outputs) == 1 and outputs[0]
    model.train()  # detectron2's evaluator restores the training mode
    assert not model.teacher.training
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("stage1")
    return str(tmp_path / "stage1.pth"), tokens_after


def run_stage2(model, needs, stage1_tokens, cfg=None, plain_student=None):
    for k, v in model.tokens.state_dict().items():
        assert torch.equal(v, stage1_tokens[k]), f"token {k} not loaded from stage 1"
    frozen = {"teacher": snapshot(model.teacher), "tokens": snapshot(model.tokens)}
    student_before = snapshot(model.student)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("student.", "align.")) for n in trainable)
    assert any(n.startswith("align.") for n in trainable)
    optimizer = build_optimizer(cfg or get_cfg(), model)
    expected = {id(p) for p in model.student.parameters() if p.requires_grad}
    expected |= {id(p) for p in model.align.parameters()}
    assert optimizer_param_ids(optimizer) == expected

    losses = train(model, optimizer, needs, steps=3)
    assert losses[0]["loss_maskd"] > 0
    assert_unchanged(frozen["teacher"], model.teacher)
    assert_unchanged(frozen["tokens"], model.tokens)
    assert not model.teacher.training
    after = model.student.state_dict()
    assert any(not torch.equal(student_before[k], after[k]) for k in student_before)

    model.eval()
    batch = tiny_batch(2, 64, seed=7, **needs)
    with torch.no_grad():
        ours = model(batch)
    if plain_student is not None:
        # Evaluation gives exactly what a plain detectron2 model with the student's weights gives.
        plain_student.load_state_dict(model.student.state_dict())
        plain_student.eval()
        with torch.no_grad():
            plain = plain_student(batch)
        assert_same_outputs(ours, plain)
    model.train()
    assert not model.teacher.training


def assert_same_outputs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key == "instances":
                fx, fy = x[key].get_fields(), y[key].get_fields()
                assert fx.keys() == fy.keys()
                for f in fx:
                    va, vb = fx[f], fy[f]
                    va = va.tensor if hasattr(va, "tensor") else va
                    vb = vb.tensor if hasattr(vb, "tensor") else vb
                    assert torch.equal(va, vb), f
            elif key == "panoptic_seg":
                assert torch.equal(x[key][0], y[key][0])
            else:
                assert torch.equal(x[key], y[key]), key


# ----------------------------------------------------------------------------- both stages
@pytest.mark.parametrize("kind", ["rcnn", "mask_rcnn", "retinanet", "panoptic", "semantic"])
def test_both_stages_yacs(tmp_path, kind):
    needs = NEEDS[kind]
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, kind)

    cfg1 = maskd_cfg("MasKDTokenLearner", kind, teacher_config, teacher_weights)
    model1 = build_model(cfg1)
    assert isinstance(model1, MasKDTokenLearner)
    stage1_file, stage1_tokens = run_stage1(tmp_path, model1, needs, cfg1)

    cfg2 = maskd_cfg("MasKD", kind, teacher_config, teacher_weights, stage1_file)
    torch.manual_seed(1)
    model2 = build_model(cfg2)
    assert isinstance(model2, MasKD)
    plain_cfg = cfg2.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = cfg2.MODEL.MASKD.STUDENT_META_ARCHITECTURE
    run_stage2(model2, needs, stage1_tokens, cfg2, plain_student=build_model(plain_cfg))


def test_cascade_teacher_faster_rcnn_student(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "cascade")
    model1 = build_model(maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights))
    stage1_file, tokens = run_stage1(tmp_path, model1, NEEDS["cascade"])
    model2 = build_model(maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights, stage1_file))
    assert type(model2.teacher).__name__ == "GeneralizedRCNN"
    assert type(model2.teacher.roi_heads).__name__ == "CascadeROIHeads"
    run_stage2(model2, NEEDS["rcnn"], tokens)


def test_retinanet_student_rcnn_teacher_distils_common_levels(tmp_path, caplog):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg1 = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    model1 = build_model(cfg1)
    assert model1.in_features == ["p2", "p3", "p4", "p5", "p6"]
    stage1_file, tokens = run_stage1(tmp_path, model1, {})
    cfg2 = maskd_cfg("MasKD", "retinanet", teacher_config, teacher_weights, stage1_file)
    # By default the token levels the student has at the same stride: P2 is R-CNN's only (left
    # out, with a warning that names it), P7 RetinaNet's only.
    with caplog.at_level(logging.WARNING, logger="maskd.modeling.pairing"):
        model2 = build_model(cfg2)
    assert model2.in_features == ["p3", "p4", "p5", "p6"]
    assert "'p2' (the student has no level 'p2')" in caplog.text
    assert sorted(model2.tokens.keys()) == ["p3", "p4", "p5", "p6"]
    run_stage2(model2, {}, {k: v for k, v in tokens.items() if not k.startswith("p2.")})
    # Asked for explicitly, a level the student lacks is an error naming both level sets.
    cfg2.MODEL.MASKD.IN_FEATURES = ["p2", "p3"]
    with pytest.raises(ValueError, match=r"'p2' cannot be aligned.*student levels \{p3: stride 8"):
        build_model(cfg2)


def test_fcos_lazyconfig_both_stages(tmp_path):
    torch.manual_seed(0)
    teacher_node = tiny_fcos(depth=TEACHER_DEPTH, fpn_channels=TEACHER_FPN, norm="BN")
    teacher = instantiate(teacher_node)
    calibrate_bn(teacher)
    weights = tmp_path / "fcos_teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)

    teacher_built = L(build_teacher)(
        config_file=str(tmp_path / "fcos_teacher.py"), weights=str(weights)
    )
    (tmp_path / "fcos_teacher.py").write_text(
        "from tiny import tiny_fcos\n" f"model = tiny_fcos({TEACHER_DEPTH}, {TEACHER_FPN}, 'BN')\n"
    )
    stage1 = L(MasKDTokenLearner)(teacher=teacher_built, num_tokens=3)
    model1 = instantiate(stage1)
    assert model1.in_features == ["p3", "p4", "p5", "p6", "p7"]
    stage1_file, tokens = run_stage1(tmp_path, model1, {})

    stage2 = L(MasKD)(
        student=tiny_fcos(depth=STUDENT_DEPTH, fpn_channels=STUDENT_FPN, norm="GN"),
        teacher=teacher_built,
        tokens=L(tokens_from_file)(weights=stage1_file, num_tokens=3),
        loss_weight=10.0,
    )
    model2 = instantiate(stage2)
    assert model2.align["p3"].in_channels == STUDENT_FPN
    assert model2.align["p3"].out_channels == TEACHER_FPN
    run_stage2(model2, {}, tokens, plain_student=instantiate(stage2.student))


# ----------------------------------------------------------------------------- invariants
@pytest.fixture
def stage2_model(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    return build_model(cfg), cfg


def test_teacher_is_ready_when_built(tmp_path):
    teacher_config, teacher_weights, teacher = write_teacher(tmp_path, "rcnn", seed=3)
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    model = build_model(cfg)
    for k, v in teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.tokens.parameters())


def test_teacher_opts_override_the_teacher_config(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.MASKD.TEACHER.OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3"]
    assert build_model(cfg).teacher.roi_heads.box_predictor.test_score_thresh == 0.3


def test_teacher_heads_never_run_in_stage2(stage2_model):
    model, cfg = stage2_model

    def boom(*args, **kwargs):
        raise AssertionError("a teacher head ran in stage 2")

    model.teacher.proposal_generator.forward = boom
    model.teacher.roi_heads.forward = boom
    optimizer = build_optimizer(cfg, model)
    train(model, optimizer, {}, steps=1)


def test_the_student_features_are_kept_for_one_step_only(stage2_model):
    """What the student's forward made is read inside the step's recording and dropped after
    it: no graph outlives the step, a forward outside a step keeps nothing, steps do not nest."""
    model, cfg = stage2_model
    backbone = model.student.backbone
    kept = []
    read = backbone.recorded
    backbone.recorded = lambda key: kept.append(read(key)) or kept[-1]
    train(model, build_optimizer(cfg, model), {}, steps=1)
    assert set(kept[0]) == set(model.in_features)  # the step read this forward's features
    with pytest.raises(RuntimeError, match="outside a recording"):
        read("features")
    batch = tiny_batch(1, 64, seed=0)
    with recording(model.student):
        model.student.eval()(batch)  # inference keeps nothing
        with pytest.raises(RuntimeError, match="no 'features' was made"):
            read("features")
        with pytest.raises(RuntimeError, match="already open"):
            with recording(model.student):
                pass
    with torch.no_grad(), EventStorage(0):
        model.student.train()(batch)  # a training forward outside a step keeps nothing either
    assert backbone._record is None


def test_model_weights_load_only_into_the_student(tmp_path, stage2_model):
    model, _ = stage2_model
    # An ImageNet-style file: bare backbone keys, loaded with detectron2's name matching.
    torch.manual_seed(9)
    donor_cfg = tiny_cfg("rcnn", depth=STUDENT_DEPTH, fpn_channels=STUDENT_FPN)
    donor_cfg.MODEL.RESNETS.NORM = "GN"
    donor = build_model(donor_cfg)
    bottom_up = {k: v.numpy() for k, v in donor.backbone.bottom_up.state_dict().items()}
    path = tmp_path / "imagenet.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": bottom_up, "__author__": "test", "matching_heuristics": True}, f)

    teacher_before = snapshot(model.teacher)
    MasKDCheckpointer(model).load(str(path))
    assert_unchanged(teacher_before, model.teacher)
    student = model.student.backbone.inner.bottom_up.state_dict()
    for k, v in bottom_up.items():
        assert torch.equal(student[k], torch.from_numpy(v)), k

    # Without routing, detectron2's name matching finds the teacher's keys as well.
    with pytest.raises(ValueError, match="multiple keys"):
        DetectionCheckpointer(model).load(str(path))


def test_maskd_checkpoint_round_trip(tmp_path, stage2_model):
    model, cfg = stage2_model
    with torch.no_grad():
        for p in model.align.parameters():
            p.add_(1.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("stage2")
    state = torch.load(tmp_path / "stage2.pth", weights_only=False)["model"]
    # Plain detectron2 keys under student. and teacher.: the wrappers are transparent.
    assert "student.backbone.bottom_up.stem.conv1.weight" in state
    assert "teacher.backbone.bottom_up.stem.conv1.weight" in state
    assert not any(".inner." in k for k in state)
    fresh = build_model(cfg)
    MasKDCheckpointer(fresh).load(str(tmp_path / "stage2.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_custom_masks_after_warmup(stage2_model):
    model, _ = stage2_model
    model.custom_mask_warmup = 5
    torch.manual_seed(0)
    s = {lv: torch.randn(2, STUDENT_FPN, 8, 8) for lv in model.in_features}
    t = {lv: torch.randn(2, TEACHER_FPN, 8, 8) for lv in model.in_features}

    def expected(custom):
        out = {}
        for lv in model.in_features:
            rt, aligned = model.tokens[lv], model.align[lv](s[lv])
            masks = rt.masks(t[lv]) * (rt.masks(aligned) if custom else 1.0)
            out[lv] = masked_distillation_loss(aligned, t[lv], masks, rt.weights(t[lv]))
        return out

    for it, custom in [(0, False), (4, False), (5, True), (100, True)]:
        with EventStorage(it):
            assert model.custom_masks_active() == custom
            got, _, _ = model.distillation_losses(s, t)
        want = expected(custom)
        for lv in model.in_features:
            torch.testing.assert_close(got[lv], want[lv])
    model.custom_mask_warmup = -1
    with EventStorage(10**6):
        assert not model.custom_masks_active()


def test_mismatched_spatial_sizes_name_the_level(stage2_model):
    model, _ = stage2_model
    lv = model.in_features[0]
    s = {lv: torch.randn(2, STUDENT_FPN, 8, 8)}
    t = {lv: torch.randn(2, TEACHER_FPN, 8, 6)}
    model.in_features = [lv]
    with (
        EventStorage(0),
        pytest.raises(ValueError, match=rf"'{lv}'.*\(2, 16, 8, 8\).*\(2, 32, 8, 6\)"),
    ):
        model.distillation_losses(s, t)


def test_in_features_errors(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKD", "retinanet", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.ALLOW_RANDOM_TOKENS = True
    cfg.MODEL.MASKD.IN_FEATURES = ["p2", "p3"]
    with pytest.raises(ValueError, match=r"'p2'.*student"):
        build_model(cfg)
    cfg.MODEL.MASKD.IN_FEATURES = ["p7"]
    with pytest.raises(ValueError, match=r"'p7'.*teacher"):
        build_model(cfg)
    cfg.MODEL.MASKD.IN_FEATURES = []
    assert build_model(cfg).in_features == ["p3", "p4", "p5", "p6"]  # both produce these


def test_teacher_weights_errors(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(cfg)
    cfg.MODEL.MASKD.TEACHER.WEIGHTS = ""
    with pytest.raises(ValueError, match="TEACHER.WEIGHTS is empty"):
        build_model(cfg)
    # Weights of an R18 teacher for an R34 config: names the file and the keys.
    _, r18_weights, _ = write_teacher(tmp_path, "rcnn", depth=18)
    cfg.MODEL.MASKD.TEACHER.WEIGHTS = r18_weights
    with pytest.raises(ValueError, match=r"teacher_rcnn_18.pth.*missing keys: backbone\.bottom_up"):
        build_model(cfg)
    cfg.MODEL.MASKD.TEACHER.CONFIG_FILE = "COCO-Detection/no_such_model.yaml"
    with pytest.raises(FileNotFoundError, match="no_such_model.yaml"):
        build_model(cfg)


def test_tokens_weights_errors(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg1 = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    cfg1.MODEL.MASKD.NUM_TOKENS = 8
    DetectionCheckpointer(build_model(cfg1), save_dir=str(tmp_path)).save("t8")

    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    with pytest.raises(ValueError, match="TOKENS_WEIGHTS is empty"):
        build_model(cfg)
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(cfg)
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "t8.pth")
    with pytest.raises(ValueError, match=r"t8.pth' has 8 tokens on level 'p2', 4 were asked for"):
        build_model(cfg)
    # Tokens of another channel count (a crafted export: 4 tokens x 16 channels per level).
    crafted = {f"tokens.{lv}.tokens": torch.zeros(4, 16) for lv in ["p2", "p3", "p4", "p5", "p6"]}
    torch.save({"model": crafted}, tmp_path / "c16.pth")
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "c16.pth")
    cfg.MODEL.MASKD.WEIGHTED = False
    with pytest.raises(
        ValueError, match=r"level 'p2' in '.*c16.pth' have 16 channels.*features 32"
    ):
        build_model(cfg)
    cfg.MODEL.MASKD.WEIGHTED = True
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = teacher_weights  # a checkpoint without tokens
    with pytest.raises(ValueError, match="holds no receptive tokens"):
        build_model(cfg)


def test_stage1_backbone_masks_only_the_distilled_levels(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.IN_FEATURES = ["p3", "p5"]
    model = build_model(cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.teacher.backbone.inner(x)
        masked = model.teacher.backbone(x)
    for lv, feat in plain.items():
        if lv in ("p3", "p5"):
            torch.testing.assert_close(masked[lv], model.tokens[lv].mask_features(feat))
            assert not torch.equal(masked[lv], feat)
        else:
            assert torch.equal(masked[lv], feat)
    # The stage-1 checkpoint keeps plain detectron2 teacher keys beside the tokens.
    keys = model.state_dict().keys()
    assert "teacher.backbone.bottom_up.stem.conv1.weight" in keys
    assert {"teacher.backbone.tokens.p3.tokens", "teacher.backbone.tokens.p5.tokens"} <= keys
    assert not any(".inner." in k for k in keys)


def test_stage1_refuses_levels_the_teacher_heads_do_not_read(tmp_path):
    teacher_config, teacher_weights, _ = write_teacher(tmp_path, "semantic")
    cfg = maskd_cfg("MasKDTokenLearner", "semantic", teacher_config, teacher_weights)
    assert build_model(cfg).in_features == ["p2", "p3", "p4", "p5"]  # the head ignores P6
    cfg.MODEL.MASKD.IN_FEATURES = ["p5", "p6"]
    with pytest.raises(ValueError, match=r"'p6'.*teacher offers only \['p2', 'p3', 'p4', 'p5'\]"):
        build_model(cfg)


def test_tokens_of_levels_the_teachers_heads_do_not_read_are_refused(tmp_path):
    from tiny import STUDENT_DEPTH, STUDENT_FPN, tiny_cfg, write_teacher

    from maskd import MasKD, build_teacher
    from maskd.modeling.receptive_tokens import build_level_tokens

    config, weights, _ = write_teacher(tmp_path, "semantic")  # its head reads p2-p5, not p6
    teacher = build_teacher(config, weights=weights)
    student = build_model(tiny_cfg("rcnn", depth=STUDENT_DEPTH, fpn_channels=STUDENT_FPN))
    tokens = build_level_tokens({"p5": 32, "p6": 32}, num_tokens=4, weighted=False)
    with pytest.raises(ValueError, match=r"levels \['p6'\], which the teacher's heads do not read"):
        MasKD(student=student, teacher=teacher, tokens=tokens)


def test_checkpointer_loads_plain_models_as_detectron2_does(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg("rcnn"))
    torch.save({"model": source.state_dict()}, tmp_path / "plain.pth")
    torch.manual_seed(1)
    target = build_model(tiny_cfg("rcnn"))
    MasKDCheckpointer(target).load(str(tmp_path / "plain.pth"))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_subclasses_under_other_names_evaluate_as_their_stage(tmp_path):
    """``--eval-only`` asks the meta-architecture which model evaluates its checkpoints: a
    subclass registered under another name inherits it, so it never reads the teacher's or the
    tokens' files (here they do not exist)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from maskd.engine import build_inference_model, build_lazy_inference_model

    class MyMasKD(MasKD):
        pass

    class MyTokenLearner(MasKDTokenLearner):
        pass

    teacher_config, _, _ = write_teacher(tmp_path, "rcnn")
    for cls in (MyMasKD, MyTokenLearner):
        META_ARCH_REGISTRY.register(cls)
    try:
        cfg = maskd_cfg("MyMasKD", "rcnn", teacher_config, str(tmp_path / "no_teacher.pth"))
        cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(tmp_path / "no_tokens.pth")
        student = build_inference_model(cfg)
        assert type(student).__name__ == "GeneralizedRCNN"  # the student alone
        cfg.MODEL.META_ARCHITECTURE = "MyTokenLearner"
        learner = build_inference_model(cfg)
        assert isinstance(learner, MyTokenLearner) and learner.teacher_from_checkpoint
    finally:
        for cls in (MyMasKD, MyTokenLearner):
            META_ARCH_REGISTRY._obj_map.pop(cls.__name__)
    # LazyConfig: the class's own lazy_inference_node
    node = L(MyMasKD)(student=L(torch.nn.Identity)(), teacher=None, tokens=None)
    lazy = type("Cfg", (), {"model": node, "train": type("T", (), {"device": "cpu"})})
    assert isinstance(build_lazy_inference_model(lazy), torch.nn.Identity)
