"""A semantic head's output logits as the distillation point (the paper's segmentation recipe):
stage 1 learns tokens on the teacher's logits from its loss on the masked logits, stage 2 pulls
the student's logits towards the teacher's under the masks without an align conv; both against
independent references, on tiny semantic FPN models on CPU."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import NUM_CLASSES, maskd_cfg, tiny_batch, write_teacher

from maskd.modeling.logits import LOGITS, teacher_logits
from maskd.modeling.reference import naive_masked_distillation_loss
from maskd.modeling.teacher import preprocess_images

PAPER = {  # the paper's segmentation settings
    "MODEL.MASKD.IN_FEATURES": '["logits"]',
    "MODEL.MASKD.NUM_TOKENS": "8",
    "MODEL.MASKD.WEIGHTED": "False",
    "MODEL.MASKD.CUSTOM_MASK_WARMUP": "-1",
    "MODEL.MASKD.LOSS_WEIGHT": "0.5",
    "MODEL.MASKD.ALIGN": "False",
}


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logits")
    config, weights, _ = write_teacher(tmp, "semantic")
    return tmp, config, weights


def _cfg(stage, teacher_files, tokens="", **extra):
    _, config, weights = teacher_files
    cfg = maskd_cfg(stage, "semantic", config, weights, tokens)
    for key, value in {**PAPER, **extra}.items():
        cfg.merge_from_list([key, value])
    return cfg


def _stage1(teacher_files, **extra):
    torch.manual_seed(0)
    model = build_model(_cfg("MasKDTokenLearner", teacher_files, **extra))
    for rt in model.tokens.values():
        with torch.no_grad():
            rt.tokens.normal_(0, 0.3)  # trained-size tokens: masks far from 0.5
    return model


def _tokens_file(teacher_files, model):
    path = teacher_files[0] / "logits_tokens.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_stage1_learns_tokens_on_the_logits_from_the_heads_loss_on_masked_logits(teacher_files):
    model = _stage1(teacher_files)
    assert model.in_features == [LOGITS]
    rt = model.tokens[LOGITS]
    assert rt.channels == NUM_CLASSES + 1 and rt.num_tokens == 8 and not rt.weighted
    batch = tiny_batch(2, 64, seed=0, with_sem_seg=True)
    model.train()
    with EventStorage(0) as storage:
        losses = model(batch)
        logged = {k: v.latest() for k, v in storage.histories().items()}
    assert {"loss_sem_seg", "loss_dice"} <= set(losses)
    assert f"[metric]tokens/{LOGITS}/coverage" in logged

    # the reference: the teacher's plain logits, masked as the paper does (sum over tokens),
    # and the head's own loss on them
    teacher = model.teacher
    with torch.no_grad():
        images = preprocess_images(teacher, batch)
        with model.masks_disabled():
            feats = teacher.backbone(images.tensor)
            logits = teacher_logits(teacher, feats)
    masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, logits))
    masked = logits * masks.sum(dim=1, keepdim=True)
    targets = torch.stack([x["sem_seg"] for x in batch])  # the batch is not padded (64 x 64)
    want = teacher.sem_seg_head.losses(masked, targets)["loss_sem_seg"]
    torch.testing.assert_close(losses["loss_sem_seg"], want, rtol=1e-5, atol=1e-6)
    # the task loss trains the tokens through the masked logits; the teacher stays frozen
    (grad,) = torch.autograd.grad(losses["loss_sem_seg"], rt.tokens)
    assert grad.abs().sum() > 0
    assert not any(p.requires_grad for n, p in teacher.named_parameters() if "tokens" not in n)
    # evaluation: the masked teacher, and the plain one inside masks_disabled()
    model.eval()
    with torch.no_grad():
        masked_out = model(batch[:1])[0]["sem_seg"]
        with model.masks_disabled():
            plain_out = model(batch[:1])[0]["sem_seg"]
    assert not torch.allclose(masked_out, plain_out)
    # the tokens are saved where every stage-1 checkpoint keeps them
    assert any(k.startswith(f"teacher.backbone.tokens.{LOGITS}.") for k in model.state_dict())
    assert not any("predictor.level_tokens" in k for k in model.state_dict())


def test_stage2_pulls_the_student_logits_to_the_teachers_without_an_align_conv(teacher_files):
    tokens = _tokens_file(teacher_files, _stage1(teacher_files))
    torch.manual_seed(1)
    model = build_model(_cfg("MasKD", teacher_files, tokens))
    assert model.in_features == [LOGITS]
    assert isinstance(model.align[LOGITS], torch.nn.Identity)
    assert not any(k.startswith("align.") for k in model.state_dict())
    batch = tiny_batch(2, 64, seed=3, with_sem_seg=True)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_sem_seg", "loss_maskd"} <= set(losses)

    # the reference: both models' logits computed apart, the loss written out
    with torch.no_grad():
        t_images = preprocess_images(model.teacher, batch)
        t_logits = teacher_logits(model.teacher, model.teacher.backbone(t_images.tensor))
        s_images = preprocess_images(model.student, batch)
        s_logits = teacher_logits(model.student, model.student.backbone(s_images.tensor))
    rt = model.tokens[LOGITS]
    masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, t_logits))
    want = 0.5 * naive_masked_distillation_loss(s_logits, t_logits, masks)
    torch.testing.assert_close(losses["loss_maskd"], want, rtol=1e-5, atol=1e-7)
    # it trains the student's whole head, predictor included
    predictor = model.student.sem_seg_head.predictor.inner
    (grad,) = torch.autograd.grad(losses["loss_maskd"], predictor.weight)
    assert grad.abs().sum() > 0
    # inference is the plain student's; its checkpoint keys are the plain model's
    keys = set(model.student.state_dict())
    assert "sem_seg_head.predictor.weight" in keys and not any("inner" in k for k in keys)


def test_logits_of_other_classes_and_unaligned_channels_are_refused(teacher_files):
    tokens = _tokens_file(teacher_files, _stage1(teacher_files))
    other = _cfg("MasKD", teacher_files, tokens)
    other.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES + 3
    with pytest.raises(ValueError, match=r"teacher predicts 4 classes and the student 6"):
        build_model(other)
    # features without an align conv: the channels must agree (teacher 32, student 16)
    feats = _cfg("MasKDTokenLearner", teacher_files, **{"MODEL.MASKD.IN_FEATURES": '["p3"]'})
    torch.manual_seed(0)
    p3 = _tokens_file(teacher_files, build_model(feats))
    unaligned = _cfg("MasKD", teacher_files, p3, **{"MODEL.MASKD.IN_FEATURES": '["p3"]'})
    with pytest.raises(ValueError, match=r"ALIGN False.*'p3' student 16, teacher 32"):
        build_model(unaligned)
    unaligned.MODEL.MASKD.ALIGN = True  # the paper's detection recipe: a 1x1 conv
    assert isinstance(build_model(unaligned).align["p3"], torch.nn.Conv2d)


def test_logits_are_refused_for_a_teacher_without_a_semantic_head(tmp_path):
    config, weights, _ = write_teacher(tmp_path, "rcnn")
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", config, weights)
    cfg.MODEL.MASKD.IN_FEATURES = [LOGITS]
    with pytest.raises(ValueError, match=r"level 'logits'.*GeneralizedRCNN model has no sem_seg"):
        build_model(cfg)
