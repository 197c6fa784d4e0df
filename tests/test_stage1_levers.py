"""The opt-in levers of stage 1's objective (none is the paper's): those for tokens that
partition the map and the mask-area prior. Each one's value against a written-out reference and
its gradient, the tokens' form kept through checkpoints and checked between the stages, a stage-1
step with every lever on."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tiny import maskd_cfg, tiny_batch, write_teacher

from maskd.checkpoint.tokens import tokens_from_file
from maskd.modeling.losses import (
    combined_mask,
    dice_diversity_loss,
    masked_aggregate,
    min_token_area_loss,
    neutral_fill,
    saliency_cell_loss,
    union_mask,
)
from maskd.modeling.meta_arch.token_learner import task_loss_mode
from maskd.modeling.receptive_tokens import ReceptiveTokens
from maskd.modeling.reference import naive_dice_diversity_loss, naive_mask_features
from maskd.modeling.teacher import preprocess_images
from maskd.modeling.wrappers import recording


def _features(n=2, c=6, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64)


def _tokens(c=6, t=4, seed=1, **kwargs):
    torch.manual_seed(seed)
    rt = ReceptiveTokens(c, t, **kwargs).double()
    with torch.no_grad():
        rt.tokens.normal_(0, 0.5)  # trained-size tokens: masks far from 0.5
    return rt


# ----------------------------------------------------------------------------- mask norm
def test_softmax_masks_partition_each_cell_and_match_the_written_out_softmax():
    x = _features()
    rt = _tokens(mask_norm="softmax", weighted=False)
    masks = rt.masks(x)
    logits = torch.einsum("tc,nchw->nthw", rt.tokens, x)
    want = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(masks, want)
    torch.testing.assert_close(masks.sum(dim=1), torch.ones(2, 5, 7, dtype=torch.float64))
    sigmoid = _tokens(weighted=False).masks(x)  # the paper's: the masks of a cell do not sum to 1
    assert (sigmoid.sum(dim=1) - 1).abs().max() > 0.3
    # gradient: against autograd through the written-out softmax
    (g_ours,) = torch.autograd.grad((masks * torch.cos(masks)).sum(), rt.tokens)
    (g_ref,) = torch.autograd.grad((want * torch.cos(want)).sum(), rt.tokens)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.gradcheck(
        lambda tk: torch.einsum("tc,nchw->nthw", tk, x).softmax(1), rt.tokens
    )


# ----------------------------------------------------------------------------- weight floor
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_the_weight_floor_keeps_every_token_above_eps_over_t(eps):
    x = _features()
    rt = _tokens(weight_floor=eps)
    plain = _tokens(weight_floor=0.0)  # the same parameters (same seed)
    w, p = rt.weights(x), plain.weights(x)
    torch.testing.assert_close(w, eps / 4 + (1 - eps) * p)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, dtype=torch.float64))
    with torch.no_grad():  # extreme logits: the paper's weights go one-hot, floored ones cannot
        for r in (rt, plain):
            r.weight_head[2].bias.copy_(torch.tensor([60.0, 0.0, 0.0, 0.0]))
    assert plain.weights(x).min() < 1e-20
    assert rt.weights(x).min() >= eps / 4 - 1e-12
    # gradient: (1 - eps) times the paper's
    g = torch.randn(2, 4, dtype=torch.float64)
    (ga,) = torch.autograd.grad((rt.weights(x) * g).sum(), rt.weight_head[2].weight)
    (gb,) = torch.autograd.grad((plain.weights(x) * g).sum(), plain.weight_head[2].weight)
    torch.testing.assert_close(ga, (1 - eps) * gb)


def test_bad_forms_are_refused_by_key():
    with pytest.raises(ValueError, match="MODEL.MASKD.MASK_NORM must be one of"):
        ReceptiveTokens(4, 2, mask_norm="sparsemax")
    with pytest.raises(ValueError, match=r"MODEL.MASKD.WEIGHT_FLOOR must lie in \[0, 1\)"):
        ReceptiveTokens(4, 2, weight_floor=1.0)
    with pytest.raises(ValueError, match=r"WEIGHT_FLOOR must lie in"):
        ReceptiveTokens(4, 2, weight_floor=float("nan"))
    with pytest.raises(ValueError, match="WEIGHT_FLOOR = 0.5 needs weighted tokens"):
        ReceptiveTokens(4, 2, weighted=False, weight_floor=0.5)


# ----------------------------------------------------------------------------- fill
def test_neutral_fills_against_written_out_references():
    x = _features()
    torch.testing.assert_close(neutral_fill(x, "mean")[..., 0, 0], x.mean(dim=(2, 3)))
    blur = neutral_fill(x, "blur")
    want = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):  # the mean of the 5x5 window, cut at the border
            want[:, :, i, j] = x[:, :, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].mean(
                dim=(2, 3)
            )
    torch.testing.assert_close(blur, want)
    assert neutral_fill(x, "zeros") is None
    with pytest.raises(ValueError, match="MODEL.MASKD.FILL must be one of"):
        neutral_fill(x, "noise")


@pytest.mark.parametrize("kind", ["zeros", "mean", "blur"])
def test_the_masked_aggregate_with_a_fill_and_its_gradient(kind):
    """F~ = c F + (1 - c) fill: a cell switched off becomes the fill, not zero; the fill carries
    no gradient, and the masks' gradient is (F - fill) times the upstream gradient."""
    x = _features().requires_grad_(True)
    rt = _tokens()
    masks = rt.masks(x.detach()).detach().requires_grad_(True)
    weights = rt.weights(x.detach()).detach()
    fill = neutral_fill(x, kind)
    out = masked_aggregate(x, masks, weights, fill=fill)
    c = (masks * weights[:, :, None, None]).sum(dim=1, keepdim=True)
    ref = naive_mask_features(x, masks, weights)
    if fill is not None:
        assert not fill.requires_grad
        ref = ref + fill * (1 - c)
    torch.testing.assert_close(out, ref)
    off = masked_aggregate(x, torch.zeros_like(masks), weights, fill=fill)
    torch.testing.assert_close(off, torch.zeros_like(x) if fill is None else fill.expand_as(x))
    up = torch.randn_like(x)
    g_masks, g_x = torch.autograd.grad((out * up).sum(), [masks, x])
    base = x.detach() - (0 if fill is None else fill)
    want = ((base * up).sum(dim=1, keepdim=True) * weights[:, :, None, None]).detach()
    torch.testing.assert_close(g_masks, want)
    torch.testing.assert_close(g_x, up * c)  # the fill passes no gradient to the features


# ----------------------------------------------------------------------------- Dice pairs
def _weighted_dice_reference(masks, weights, eps=1e-6):
    n, t = masks.shape[:2]
    m = masks.reshape(n, t, -1)
    per_image = []
    for b in range(n):
        num = den = 0.0
        for i in range(t):
            for j in range(t):
                if i != j:
                    d = (
                        2
                        * (m[b, i] * m[b, j]).sum()
                        / (m[b, i].square().sum() + m[b, j].square().sum() + eps)
                    )
                    num = num + weights[b, i] * weights[b, j] * d
                    den = den + weights[b, i] * weights[b, j]
        per_image.append(num / den)
    return torch.stack(per_image).mean()


def test_weighted_dice_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = torch.rand(3, 4, generator=g, dtype=torch.float64).softmax(1).requires_grad_(True)
    ours = dice_diversity_loss(masks, weights=weights)
    ref = _weighted_dice_reference(masks, weights.detach())
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, masks, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, masks)[0]
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.grad(ours, weights, allow_unused=True)[0] is None  # weights detached
    # equal weights: the paper's Dice; a pair with all the weight decides it
    uniform = torch.full((3, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(
        dice_diversity_loss(masks, weights=uniform), naive_dice_diversity_loss(masks)
    )
    two = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3, dtype=torch.float64)
    m = masks.detach().clone()
    m[:, 2:] = m[:, :1]  # tokens 2, 3 copy token 0: the paper's Dice sees it, the weighted not
    assert dice_diversity_loss(m, weights=two) < dice_diversity_loss(m) - 0.05
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    assert dice_diversity_loss(m, weights=one_hot) == 0


# ----------------------------------------------------------------------------- min area
def test_min_token_area_value_and_gradient():
    masks = torch.zeros(1, 3, 4, 5, dtype=torch.float64)
    masks[0, 0] = 1.0  # all on: above the minimum
    masks[0, 1, :, :1] = 1.0  # 4 of 20 cells: 0.2 >= 0.15
    masks[0, 2, 0, 0] = 1.0  # 1 of 20 cells: 0.05, short by 0.10
    masks.requires_grad_(True)
    loss = min_token_area_loss(masks, 0.15)
    assert loss.item() == pytest.approx((0.10 / 0.15) / 3)
    (g,) = torch.autograd.grad(loss, masks)
    assert g[0, :2].abs().max() == 0  # tokens above the minimum: no gradient
    torch.testing.assert_close(
        g[0, 2], torch.full((4, 5), -1 / (0.15 * 20 * 3), dtype=torch.float64)
    )
    off = torch.zeros(2, 3, 4, 4)
    assert min_token_area_loss(off, 0.1).item() == pytest.approx(1.0)  # every token switched off
    with pytest.raises(ValueError, match=r"MIN_TOKEN_AREA must lie in \(0, 1\]"):
        min_token_area_loss(off, 0.0)


# ----------------------------------------------------------------------------- through stage 1
LEVERS = {
    "MODEL.MASKD.MASK_NORM": "softmax",
    "MODEL.MASKD.WEIGHT_FLOOR": 0.5,
    "MODEL.MASKD.FILL": "mean",
    "MODEL.MASKD.DICE_PAIRS": "weighted",
    "MODEL.MASKD.MIN_TOKEN_AREA": 0.1,
}


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("levers")
    teacher_config, teacher_weights, _ = write_teacher(tmp, "rcnn")
    return tmp, teacher_config, teacher_weights


def _stage1(teacher_files, **levers):
    _, teacher_config, teacher_weights = teacher_files
    cfg = maskd_cfg("MasKDTokenLearner", "rcnn", teacher_config, teacher_weights)
    for key, value in levers.items():
        cfg.merge_from_list([key, str(value)])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_a_stage1_step_with_every_lever_and_its_losses(teacher_files):
    cfg, model = _stage1(teacher_files, **LEVERS)
    model.train()
    batch = tiny_batch(2, 64, seed=0)
    with EventStorage(0) as storage:
        losses = model(batch)
        sum(losses.values()).backward()
        logged = {k: v.latest() for k, v in storage.histories().items()}
    assert {"loss_dice", "loss_token_area"} <= set(losses)
    for lv, rt in model.tokens.items():
        assert rt.mask_norm == "softmax" and rt.weight_floor == 0.5
        assert rt.tokens.grad is not None and rt.tokens.grad.abs().sum() > 0
        assert logged[f"[metric]tokens/{lv}/tokens_eff"] >= 2.0  # the floor: 1 / (0.625^2 + ...)
    with pytest.raises(RuntimeError, match="outside a recording"):  # nothing kept after the step
        model.teacher.backbone.recorded("masks")


def test_the_token_losses_are_those_of_the_exposed_masks(teacher_files):
    cfg, model = _stage1(teacher_files, **LEVERS)
    model.train()
    with EventStorage(0):
        backbone = model.teacher.backbone.train()  # as in the learner's training forward
        with recording(backbone):
            backbone(torch.randn(2, 3, 64, 64))
            masks = backbone.recorded("masks")
        model.teacher.eval()
        got = model.token_losses(masks)
    dice = sum(
        _weighted_dice_reference(m.masks.double(), m.weights.double()) for m in masks.values()
    )
    area = sum(
        (0.1 - m.masks.double().mean(dim=(2, 3))).clamp_min(0).div(0.1).mean()
        for m in masks.values()
    )
    torch.testing.assert_close(got["loss_dice"].double(), dice, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["loss_token_area"].double(), area, rtol=1e-5, atol=1e-7)
    with recording(backbone), pytest.raises(RuntimeError, match="no 'masks' was made"):
        backbone.eval()(torch.randn(2, 3, 64, 64))  # inference keeps nothing
        backbone.recorded("masks")


@pytest.mark.parametrize("gate", ["absolute", "relative"])
def test_the_weight_gate_of_the_aggregate_value_and_gradient(teacher_files, gate):
    """relative: c = sum_t (w_t / max_s w_s) M_t, the most weighted token's cells pass whole;
    absolute (the paper): c = sum_t w_t M_t. Against the aggregate written out, with its
    gradient for the tokens and the weight head."""
    _, model = _stage1(
        teacher_files, **{"MODEL.MASKD.WEIGHT_GATE": gate, "MODEL.MASKD.FILL": "mean"}
    )
    backbone = model.teacher.backbone.train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = backbone.inner(images)
    lv = "p3"
    rt = model.tokens[lv]
    with torch.no_grad():
        rt.tokens.normal_(0, 0.3)  # trained-size tokens
    out = backbone(images)[lv]
    x = feats[lv]
    m = torch.sigmoid(torch.einsum("tc,nchw->nthw", rt.tokens, x))
    w = rt.weights(x)
    g = w / w.max(dim=1, keepdim=True).values if gate == "relative" else w
    c = (m * g[:, :, None, None]).sum(dim=1, keepdim=True)
    want = x * c + x.mean(dim=(2, 3), keepdim=True) * (1 - c)
    torch.testing.assert_close(out, want)
    if gate == "relative":  # the top token's cells pass whole where its mask is 1
        assert g.max(dim=1).values.eq(1).all()
    up = torch.randn_like(out)
    params = [rt.tokens, rt.weight_head[2].weight]
    got = torch.autograd.grad((out * up).sum(), params)
    ref = torch.autograd.grad((want * up).sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_stage1_refuses_bad_levers_by_key(teacher_files):
    with pytest.raises(ValueError, match="MODEL.MASKD.DICE_PAIRS must be one of"):
        _stage1(teacher_files, **{"MODEL.MASKD.DICE_PAIRS": "some"})
    with pytest.raises(ValueError, match="MODEL.MASKD.FILL must be one of"):
        _stage1(teacher_files, **{"MODEL.MASKD.FILL": "noise"})
    with pytest.raises(ValueError, match="MODEL.MASKD.WEIGHT_GATE must be one of"):
        _stage1(teacher_files, **{"MODEL.MASKD.WEIGHT_GATE": "soft"})
    with pytest.raises(ValueError, match=r"MIN_TOKEN_AREA must lie in \[0, 1\]"):
        _stage1(teacher_files, **{"MODEL.MASKD.MIN_TOKEN_AREA": 2.0})
    with pytest.raises(ValueError, match="NUM_TOKENS = 1.*Dice"):
        _stage1(teacher_files, **{"MODEL.MASKD.NUM_TOKENS": 1})
    # without the Dice loss, one token is a choice
    _stage1(teacher_files, **{"MODEL.MASKD.NUM_TOKENS": 1, "MODEL.MASKD.DICE_WEIGHT": 0.0})


def test_the_tokens_form_travels_with_them_and_is_checked_in_stage_2(teacher_files):
    tmp, teacher_config, teacher_weights = teacher_files
    _, model = _stage1(teacher_files, **LEVERS)
    path = tmp / "partition_tokens.pth"
    torch.save({"model": model.state_dict()}, path)
    tokens = tokens_from_file(str(path))
    x = torch.randn(1, model.tokens["p2"].channels, 8, 8)
    for lv, rt in tokens.items():
        assert (rt.mask_norm, rt.weight_floor) == ("softmax", 0.5)
        torch.testing.assert_close(rt.masks(x), model.tokens[lv].masks(x))
        torch.testing.assert_close(rt.weights(x), model.tokens[lv].weights(x))
    # stage 2 with the same form builds; with the paper's form it is refused, naming the keys
    cfg = maskd_cfg("MasKD", "rcnn", teacher_config, teacher_weights)
    cfg.MODEL.MASKD.TOKENS_WEIGHTS = str(path)
    with pytest.raises(
        ValueError, match=r"mask_norm=softmax, weight_floor=0.5.*MODEL.MASKD.MASK_NORM"
    ):
        build_model(cfg)
    cfg.merge_from_list(["MODEL.MASKD.MASK_NORM", "softmax", "MODEL.MASKD.WEIGHT_FLOOR", "0.5"])
    stage2 = build_model(cfg)
    assert stage2.tokens["p2"].mask_norm == "softmax"
    # a file without a form holds tokens of the paper's form; a softmax model refuses them
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".form")}
    old = tmp / "old_tokens.pth"
    torch.save({"model": state}, old)
    assert tokens_from_file(str(old))["p2"].mask_norm == "sigmoid"
    with pytest.raises(ValueError, match=r"saved with mask_norm=sigmoid, weight_floor=0.0"):
        model.tokens["p2"].load_state_dict(
            {
                k[len("teacher.backbone.tokens.p2.") :]: v
                for k, v in state.items()
                if "tokens.p2." in k
            }
        )


# --- the area prior (MODEL.MASKD.AREA_WEIGHT) ----------------------------------------------------


def _area_model(tmp_path, area_weight):
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
    model = _area_model(tmp_path, 0.0)
    model.train()
    with EventStorage(0):
        losses = model(tiny_batch(2, 64, seed=0))
    assert "loss_area" not in losses and "loss_dice" in losses
    with pytest.raises(ValueError, match="AREA_WEIGHT must be a finite number >= 0"):
        _area_model(tmp_path, -1.0)


def test_the_area_prior_value_and_gradient(tmp_path):
    """loss_area = weight * sum over levels of the mean combined mask of the teacher's
    features, and its gradient reaches the tokens and weight heads only."""
    weight = 2.5
    model = _area_model(tmp_path, weight)
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


# ----------------------------------------------------------------------------- union and saliency
def test_the_union_of_the_masks_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    want = 1 - (1 - masks[:, 0]) * (1 - masks[:, 1]) * (1 - masks[:, 2])
    torch.testing.assert_close(union_mask(masks), want)
    up = torch.randn(2, 4, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((union_mask(masks) * up).sum(), masks)
    (ref,) = torch.autograd.grad((want * up).sum(), masks)
    torch.testing.assert_close(ours, ref)
    m = masks.detach().clone()
    m[:, 1] = 1.0  # one token on everywhere: every cell seen whole, whatever the others do
    torch.testing.assert_close(union_mask(m), torch.ones(2, 4, 5, dtype=torch.float64))
    m[:] = 0.0
    torch.testing.assert_close(union_mask(m), torch.zeros(2, 4, 5, dtype=torch.float64))


def _saliency_reference(masks, weights, saliency):
    """KL(s^ || q^) written out cell by cell, q = sum_t w_t M_t^2 / sum M_t."""
    n, t = masks.shape[:2]
    kls = []
    for b in range(n):
        s = saliency[b].flatten()
        if s.sum() == 0:
            continue
        q = sum(weights[b, i] * masks[b, i].flatten() ** 2 / masks[b, i].sum() for i in range(t))
        q, p = q / q.sum(), s / s.sum()
        kls.append(sum(p[j] * (p[j].log() - q[j].log()) for j in range(len(p)) if p[j] > 0))
    return torch.stack(kls).mean()


def test_stage_2s_loss_over_the_cells_fitted_to_the_saliency_value_and_gradient():
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(3, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    logits = torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    saliency = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    saliency[1] = 0.0  # an image the task loss does not reach: left out
    saliency[2, 0] = 0.0  # cells without saliency count nothing
    weights = logits.softmax(dim=1)
    ours = saliency_cell_loss(masks, weights, saliency)
    ref = _saliency_reference(masks, weights, saliency)
    torch.testing.assert_close(ours, ref)
    got = torch.autograd.grad(ours, [masks, logits], retain_graph=True)
    want = torch.autograd.grad(ref, [masks, logits])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0  # masks and weights both learn from it
    # hard, disjoint masks: lowest where each token's weight is its region's saliency share
    hard = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    hard[0, 0, 0, 0] = 1.0  # token 0: one cell, saliency 3
    hard[0, 1, 0, 1] = hard[0, 1, 1] = 1.0  # token 1: three cells, saliency 1 + 0 + 0
    sal = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    losses = {
        w0: saliency_cell_loss(hard, torch.tensor([[w0, 1 - w0]], dtype=torch.float64), sal)
        for w0 in (0.5, 0.7, 0.75, 0.8, 0.9)
    }
    assert min(losses, key=losses.get) == 0.75
    none = saliency_cell_loss(masks, weights, torch.zeros_like(saliency))
    assert none == 0 and none.requires_grad
    with pytest.raises(ValueError, match="do not fit"):
        saliency_cell_loss(masks, weights, saliency[:, :3])


SALIENCY = {
    "MODEL.MASKD.WEIGHT_GATE": "union",
    "MODEL.MASKD.SALIENCY_WEIGHT": 2.0,
    "MODEL.MASKD.MIN_TOKEN_AREA": 0.1,
}


def test_a_stage1_step_fits_stage_2s_loss_to_the_teachers_saliency(teacher_files, monkeypatch):
    """Union gate: the teacher sees c = 1 - prod_t (1 - M_t), and its task loss reaches the masks
    only; the weights learn from loss_saliency alone, SALIENCY_WEIGHT x KL(s^ || q^) with s
    the saliency |d task loss / d c|, computed here by a second, independent forward."""
    cfg, model = _stage1(teacher_files, **SALIENCY)
    model.train()
    batch = tiny_batch(2, 64, seed=0)
    for rt in model.tokens.values():
        with torch.no_grad():
            rt.tokens.normal_(0, 0.3)  # trained-size tokens
    with EventStorage(0) as storage:
        torch.manual_seed(0)  # the same proposal sampling as the reference below
        losses = model(batch)
        logged = {k: v.latest() for k, v in storage.histories().items()}
    assert "loss_saliency" in losses and losses["loss_saliency"] > 0
    for lv, rt in model.tokens.items():  # the fit starts from equal weights
        assert logged[f"[metric]tokens/{lv}/tokens_eff"] == pytest.approx(rt.num_tokens)
    task = {k: v for k, v in losses.items() if k not in ("loss_dice", "loss_token_area")}
    task.pop("loss_saliency")
    heads = [rt.weight_head[2].weight for rt in model.tokens.values()]
    from_task = torch.autograd.grad(sum(task.values()), heads, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in from_task)  # weights out of the view
    from_fit = torch.autograd.grad(losses["loss_saliency"], heads, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in from_fit)  # the levels the task loss reaches

    # the reference: the teacher's view made leaf tensors, the task loss differentiated by them
    backbone = model.teacher.backbone
    with torch.no_grad():
        images = preprocess_images(model.teacher, batch)
        feats = backbone.inner(images.tensor)
    views, masks, weights = {}, {}, {}
    for lv, rt in model.tokens.items():
        with torch.no_grad():
            masks[lv], weights[lv] = rt.masks(feats[lv]), rt.weights(feats[lv])
        views[lv] = (1 - (1 - masks[lv]).prod(dim=1)).requires_grad_(True)
    monkeypatch.setattr(backbone.inner, "forward", lambda x: feats)
    order = iter(list(views))
    monkeypatch.setattr(
        "maskd.modeling.backbone.teacher_view", lambda m, w, gate: views[next(order)]
    )
    with EventStorage(0), task_loss_mode(model.teacher), recording(model.teacher):
        torch.manual_seed(0)
        ref_task = model.teacher(batch)
    monkeypatch.undo()
    grads = torch.autograd.grad(sum(ref_task.values()), list(views.values()))
    want = sum(
        _saliency_reference(masks[lv].double(), weights[lv].double(), g.abs().double())
        for lv, g in zip(views, grads)
        if g.abs().sum() > 0
    )
    torch.testing.assert_close(losses["loss_saliency"].double(), 2.0 * want, rtol=1e-4, atol=1e-6)
    for lv in model.tokens:  # what the teacher sees is the union, and the statistic says so
        assert logged[f"[metric]tokens/{lv}/combined"] == pytest.approx(
            views[lv].detach().mean().item(), rel=1e-4, abs=1e-5
        )


def test_the_union_gate_needs_the_saliency_fit_for_weighted_tokens(teacher_files):
    with pytest.raises(ValueError, match="WEIGHT_GATE 'union'.*SALIENCY_WEIGHT > 0"):
        _stage1(teacher_files, **{"MODEL.MASKD.WEIGHT_GATE": "union"})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="MODEL.MASKD.SALIENCY_WEIGHT"):
            _stage1(teacher_files, **{**SALIENCY, "MODEL.MASKD.SALIENCY_WEIGHT": bad})
    _stage1(teacher_files, **{"MODEL.MASKD.WEIGHT_GATE": "union", "MODEL.MASKD.WEIGHTED": False})
    # the paper's initialisation where nothing is fitted: weights far from equal
    _, model = _stage1(teacher_files)
    assert all(rt.weight_head[2].weight.abs().sum() > 0 for rt in model.tokens.values())
