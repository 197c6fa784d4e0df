"""The receptive tokens and losses equal the plain formulation of docs/method.md, efficiently."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from maskd.modeling.losses import dice_diversity_loss, masked_distillation_loss
from maskd.modeling.receptive_tokens import ReceptiveTokens
from maskd.modeling.reference import (
    naive_dice_diversity_loss,
    naive_mask_features,
    naive_masked_distillation_loss,
)

# (N, T, C, H, W) cases: general, T = 1, H = W = 1, odd sizes.
SHAPES = [(2, 6, 8, 5, 7), (3, 1, 4, 6, 6), (2, 4, 5, 1, 1), (1, 3, 3, 4, 2)]


def _inputs(n, t, c, h, w, weighted, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, h, w, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, c, h, w, generator=g, dtype=dtype, requires_grad=True)
    masks = torch.rand(n, t, h, w, generator=g, dtype=dtype).clamp(0.05, 0.95).requires_grad_()
    weights = None
    if weighted:
        weights = torch.randn(n, t, generator=g, dtype=dtype).softmax(1).requires_grad_()
    return student, teacher, masks, weights


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_distillation_loss_matches_plain_formulation(shape, weighted):
    args = _inputs(*shape, weighted)
    ours = masked_distillation_loss(*args)
    ref = naive_masked_distillation_loss(*args)
    assert ours.dtype == torch.float64
    _assert_close(ours, ref)
    leaves = [a for a in args if a is not None]
    g_ours = torch.autograd.grad(ours, leaves)
    g_ref = torch.autograd.grad(ref, leaves)
    for a, b in zip(g_ours, g_ref):
        _assert_close(a, b)


def test_distillation_loss_by_hand():
    # One image, one channel, two pixels, one token: L = sum M^2 D^2 / sum M.
    s = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    t = torch.zeros_like(s)
    m = torch.tensor([[[[0.5, 1.0]]]], dtype=torch.float64)
    expected = (0.25 * 1.0 + 1.0 * 9.0) / 1.5
    assert masked_distillation_loss(s, t, m).item() == pytest.approx(expected, rel=1e-12)
    w = torch.tensor([[0.3]], dtype=torch.float64)
    assert masked_distillation_loss(s, t, m, w).item() == pytest.approx(0.3 * expected, rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_distillation_loss_empty_batch(weighted):
    student, teacher, masks, weights = _inputs(0, 6, 8, 5, 5, weighted)
    loss = masked_distillation_loss(student, teacher, masks, weights)
    assert loss.shape == () and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == student.shape


def test_distillation_loss_rejects_bad_shapes():
    s, t, m, w = _inputs(2, 3, 4, 5, 5, True)
    with pytest.raises(ValueError, match="same"):
        masked_distillation_loss(s, t[:, :2], m, w)
    with pytest.raises(ValueError, match="masks"):
        masked_distillation_loss(s, t, m[:, :, :4], w)
    with pytest.raises(ValueError, match="weights"):
        masked_distillation_loss(s, t, m, w[:, :2])


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_matches_plain_formulation(shape):
    n, t, _, h, w = shape
    masks = torch.rand(n, t, h, w, dtype=torch.float64, requires_grad=True)
    ours = dice_diversity_loss(masks)
    if t == 1:
        # No pair of distinct tokens: 0 by definition (the plain mean over no pair is undefined).
        assert ours.item() == 0.0 and ours.requires_grad
        return
    ref = naive_dice_diversity_loss(masks)
    _assert_close(ours, ref)
    _assert_close(torch.autograd.grad(ours, masks)[0], torch.autograd.grad(ref, masks)[0])


def test_dice_extremes():
    same = torch.rand(2, 3, 4, 4, dtype=torch.float64)[:, :1].expand(2, 3, 4, 4)
    assert dice_diversity_loss(same, eps=0.0).item() == pytest.approx(1.0, rel=1e-12)
    disjoint = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    disjoint[0, 0, 0], disjoint[0, 1, 1] = 1.0, 1.0
    assert dice_diversity_loss(disjoint).item() == 0.0


def test_dice_empty_batch():
    masks = torch.rand(0, 6, 4, 4, requires_grad=True)
    loss = dice_diversity_loss(masks)
    assert loss.item() == 0.0
    loss.backward()
    assert masks.grad.shape == masks.shape


def test_gradcheck():
    s, t, m, w = _inputs(2, 3, 4, 3, 2, True)
    assert torch.autograd.gradcheck(masked_distillation_loss, (s, t, m, w))
    assert torch.autograd.gradcheck(masked_distillation_loss, (s, t, m))
    assert torch.autograd.gradcheck(dice_diversity_loss, (m,))
    rt = ReceptiveTokens(4, 3, weighted=True).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rt.mask_features, (x,))


@pytest.mark.parametrize("weighted", [False, True])
def test_receptive_tokens_match_plain_formulation(weighted):
    torch.manual_seed(0)
    rt = ReceptiveTokens(channels=8, num_tokens=5, weighted=weighted).double()
    x = torch.randn(3, 8, 6, 7, dtype=torch.float64)
    masks = rt.masks(x)
    assert masks.shape == (3, 5, 6, 7)
    _assert_close(masks, torch.einsum("tc,nchw->nthw", rt.tokens, x).sigmoid())
    weights = None
    if weighted:
        weights = rt.weights(x)
        assert weights.shape == (3, 5)
        conv1, _, conv2 = rt.weight_head
        manual = conv2(F.conv2d(x, conv1.weight, conv1.bias, padding=1).mean((2, 3), True))
        _assert_close(weights, manual.flatten(1).softmax(1))
        _assert_close(weights.sum(1), torch.ones(3, dtype=torch.float64))
    else:
        with pytest.raises(RuntimeError, match="weight"):
            rt.weights(x)
    ours = rt.mask_features(x)
    plain_masks = torch.einsum("tc,nchw->nthw", rt.tokens, x).sigmoid()
    plain_weights = manual.flatten(1).softmax(1) if weighted else None
    plain = naive_mask_features(x, plain_masks, plain_weights)
    _assert_close(ours, plain)
    # Stage 1 trains the tokens and the weight head: their gradients must match too.
    probe = torch.randn_like(x)
    params = list(rt.parameters())
    for a, b in zip(
        torch.autograd.grad((ours * probe).sum(), params),
        torch.autograd.grad((plain * probe).sum(), params),
    ):
        _assert_close(a, b)


def test_receptive_tokens_init():
    torch.manual_seed(0)
    rt = ReceptiveTokens(channels=256, num_tokens=6, weighted=True)
    assert isinstance(rt.tokens, torch.nn.Parameter) and rt.tokens.shape == (6, 256)
    assert abs(rt.tokens.mean().item()) < 2e-3
    assert rt.tokens.std().item() == pytest.approx(0.01, rel=0.1)
    conv1, pool, conv2 = rt.weight_head
    assert isinstance(pool, torch.nn.AdaptiveAvgPool2d)
    assert conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.05)
    assert conv2.weight.std().item() == pytest.approx(math.sqrt(2 / 6), rel=0.1)
    assert conv1.bias.abs().max().item() == 0 and conv2.bias.abs().max().item() == 0
    assert ReceptiveTokens(16, 8, weighted=False).weight_head is None
    with pytest.raises(ValueError, match=r"\(N, 16, H, W\)"):
        ReceptiveTokens(16, 2).masks(torch.randn(1, 8, 4, 4))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("weighted", [False, True])
def test_no_n_t_c_h_w_intermediate(weighted):
    n, t, c, h, w = 2, 6, 16, 12, 10
    rt = ReceptiveTokens(c, t, weighted=weighted)
    x_t = torch.randn(n, c, h, w)
    feature_size = n * c * h * w

    def run(loss_fn, aggregate_fn):
        student = torch.randn(n, c, h, w, requires_grad=True)
        masks = rt.masks(x_t)
        weights = rt.weights(x_t) if weighted else None
        loss = loss_fn(student, x_t, masks, weights) + aggregate_fn(student, masks, weights).sum()
        loss.backward()

    with _LargestTensor() as ours:
        run(masked_distillation_loss, lambda x, *_: rt.mask_features(x))
    assert ours.largest <= feature_size
    with _LargestTensor() as naive:  # the check can fail: the plain formulation trips it
        run(naive_masked_distillation_loss, naive_mask_features)
    assert naive.largest == t * feature_size


def test_float32_reductions_under_autocast():
    torch.manual_seed(0)
    n, t, c, h, w = 2, 4, 32, 9, 9
    rt = ReceptiveTokens(c, t, weighted=True)
    student = torch.randn(n, c, h, w).bfloat16()
    teacher = torch.randn(n, c, h, w).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks = rt.masks(teacher)
        weights = rt.weights(teacher)
        loss = masked_distillation_loss(student, teacher, masks, weights)
        dice = dice_diversity_loss(masks)
    assert masks.dtype == weights.dtype == loss.dtype == dice.dtype == torch.float32
    ref = naive_masked_distillation_loss(
        student.double(), teacher.double(), masks.double(), weights.double()
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        dice.double(), naive_dice_diversity_loss(masks.double()), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (4, 1), (2, 2), (7, 9)])
def test_weights_equal_the_convolutional_head(hw):
    torch.manual_seed(0)
    rt = ReceptiveTokens(channels=6, num_tokens=3, weighted=True).double()
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    with torch.no_grad():
        for p in rt.weight_head.parameters():
            p.normal_()  # non-zero biases too
    reference = rt.weight_head(x).flatten(1).softmax(1)  # the literal Conv3x3-pool-Conv1x1
    _assert_close(rt.weights(x), reference)
