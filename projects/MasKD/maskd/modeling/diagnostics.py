"""Token-quality diagnostics: is each level's set of receptive masks informative?

Learned tokens can fail quietly: a mask that is the same value over the whole image (all on or
all off) selects nothing, and tokens that all cover the same pixels are redundant. The numbers
below make such failures visible during both stages (event storage: metric printer,
``metrics.json``, tensorboard), in the mask figures and in the demo report. Per level:

* ``coverage``: the mean mask value over images, tokens and pixels (0: nothing selected,
  1: everything).
* ``constant``: the share of (image, token) masks that are near-constant, i.e. whose spatial
  standard deviation is below ``CONSTANT_STD`` (0.05 on the (0, 1) mask scale). A mask that is
  1 on 3% of the image and 0 elsewhere has std 0.17; untrained tokens (entries N(0, 0.01^2))
  give masks of std well below 0.05 on features of moderate size.
* ``dice``: the mean Dice overlap of the masks of two different tokens of an image (the value
  of the Dice diversity loss; 0: disjoint masks, 1: identical).
* ``weight_entropy``: the entropy of the per-image token weights divided by log(T), averaged
  over images (1: uniform weights, 0: one token takes all the weight). Weighted tokens only.
* ``combined``: the mean of the combined mask ``sum_t w_t M_t`` (unweighted: ``sum_t M_t``),
  the factor by which stage 1 multiplies the teacher's features before its heads see them
  (in stage 1 the mask its weight gate makes: with the relative gate ``sum_t (w_t / max_s
  w_s) M_t``, with the union gate ``1 - prod_t (1 - M_t)``).
  Near 0, the level is switched off: e.g. the weights went to a token whose mask is all off,
  and the masked teacher loses accuracy (its retention falls).

What stage 2 can gain over whole-map mimicking comes from several weighted tokens on different
regions, each normalised by its own area (``w_t sum M_t^2 D^2 / sum M_t``), so three numbers
measure that mechanism:

* ``tokens_eff``: the effective number of weighted tokens, ``1 / sum_t w_t^2`` averaged over
  images (1: one token carries all the weight; T: equal weights). Unweighted tokens count as
  equal weights 1/T (the loss averages them), so T.
* ``weighted_dice``: how much the weighted tokens' masks overlap: the pairwise Dice of the masks
  weighted by ``w_i w_j`` (``sum_{i != j} w_i w_j dice_ij / sum_{i != j} w_i w_j``), averaged
  over images; 0 where one token has all the weight (no weighted pair).
* ``gt_share`` (when the ground-truth boxes are given): the share of stage 2's per-cell loss
  weight ``sum_t w_t M_t^2 / sum M_t`` that falls on the cells of the ground-truth boxes,
  averaged over the images that have boxes; ``gt_share_uniform`` is the same share under
  whole-map mimicking, i.e. the boxes' share of the cells. Their ratio is the re-weighting of
  the objects the masks achieve (1: none).

Padding (the area beyond each image's size in a padded batch) is left out when the image sizes
are given.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "CONSTANT_STD",
    "STAT_NAMES",
    "token_statistics",
    "level_sizes",
    "put_token_statistics",
    "put_level_statistics",
    "foreground_cells",
]

# A mask whose spatial standard deviation is below this counts as near-constant.
CONSTANT_STD = 0.05
# The statistics of token_statistics, in the order reports and figures show them.
STAT_NAMES = (
    "coverage",
    "constant",
    "dice",
    "weight_entropy",
    "combined",
    "tokens_eff",
    "weighted_dice",
    "gt_share",
    "gt_share_uniform",
)


def foreground_cells(batched_inputs, stride: int, height: int, width: int):
    """(N, H, W) 0/1 cells of each image's ground-truth boxes at one level (as the
    ``gt_boxes`` mask source marks them), or None where an input has no ``instances``.

    Args:
        batched_inputs: N dicts as detectron2's DatasetMapper makes them (boxes in the batch's
            pixel coordinates).
        stride: the level's stride; height, width: its grid.
    """
    from .mask_sources.gt_boxes import box_cells

    if not batched_inputs or any("instances" not in x for x in batched_inputs):
        return None
    return torch.stack(
        [box_cells(x["instances"].gt_boxes.tensor, stride, height, width) for x in batched_inputs]
    )


def level_sizes(image_sizes: Sequence[Tuple[int, int]], padded: Tuple[int, int], feature_hw):
    """The valid (h, w) of each image at one feature level.

    Args:
        image_sizes: N (h, w) image sizes before padding (``ImageList.image_sizes``).
        padded: (H, W) of the padded batch.
        feature_hw: (H_l, W_l) of the level's feature map.

    Returns:
        list of N (h_l, w_l): ceil(h * H_l / H), ceil(w * W_l / W).
    """
    fh, fw = feature_hw
    return [
        (min(fh, math.ceil(h * fh / padded[0])), min(fw, math.ceil(w * fw / padded[1])))
        for h, w in image_sizes
    ]


@torch.no_grad()
def token_statistics(
    masks: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    sizes: Optional[Sequence[Tuple[int, int]]] = None,
    constant_std: float = CONSTANT_STD,
    foreground: Optional[torch.Tensor] = None,
    combined: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """The token-quality numbers of one feature level (see the module docstring).

    Args:
        masks: (N, T, H, W) soft masks in (0, 1).
        weights: (N, T) token weights (rows sum to 1), or None for unweighted tokens.
        sizes: N valid (h, w) at this level's resolution (see :func:`level_sizes`); the area
            beyond them is left out. None: the whole map.
        constant_std: spatial standard deviation below which a mask counts as near-constant.
        foreground: (N, H, W) 0/1 cells of the ground-truth boxes (:func:`foreground_cells`),
            or None.
        combined: (N, H, W) what the teacher sees of each cell in stage 1
            (:meth:`maskd.modeling.backbone.TokenMaskedBackbone.teacher_view`), or None:
            ``sum_t w_t M_t``.

    Returns:
        dict of 0-dim float tensors: "coverage", "constant", "dice", "weight_entropy" (only
        with ``weights``), "combined", "tokens_eff", "weighted_dice", and with ``foreground``
        (if some image has box cells) "gt_share" and "gt_share_uniform". Empty for N == 0.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, T, H, W), got {tuple(masks.shape)}")
    n, t, h, w = masks.shape
    if n == 0:
        return {}
    m = masks.detach().float().flatten(2)  # (N, T, HW)
    if sizes is None:
        valid = torch.ones(n, 1, h * w, dtype=m.dtype, device=m.device)
    else:
        if len(sizes) != n:
            raise ValueError(f"{len(sizes)} image sizes for {n} images of masks")
        rows = torch.arange(h, device=m.device)
        cols = torch.arange(w, device=m.device)
        hv = torch.tensor([s[0] for s in sizes], device=m.device)
        wv = torch.tensor([s[1] for s in sizes], device=m.device)
        valid = (rows[None, :, None] < hv[:, None, None]) & (
            cols[None, None, :] < wv[:, None, None]
        )
        valid = valid.reshape(n, 1, h * w).to(m.dtype)  # (N, 1, HW)
    m = m * valid
    area = valid.sum(dim=2).clamp_min(1.0)  # (N, 1)
    mean = m.sum(dim=2) / area  # (N, T)
    var = (m.square().sum(dim=2) / area - mean.square()).clamp_min(0.0)  # (N, T)
    out = {
        "coverage": mean.mean(),
        "constant": (var.sqrt() < constant_std).float().mean(),
    }
    if weights is not None and weights.shape != (n, t):
        raise ValueError(f"weights must have shape (N, T) = ({n}, {t}), got {tuple(weights.shape)}")
    # the weights as the loss applies them: unweighted tokens are averaged
    w_loss = m.new_full((n, t), 1.0 / t) if weights is None else weights.detach().float()
    pair = w_loss.unsqueeze(2) * w_loss.unsqueeze(1)  # (N, T, T): w_i w_j
    if t > 1:
        gram = torch.bmm(m, m.transpose(1, 2))  # (N, T, T); padding is zero
        sq = torch.diagonal(gram, dim1=1, dim2=2)  # (N, T)
        dice = 2.0 * gram / (sq.unsqueeze(2) + sq.unsqueeze(1) + 1e-6)
        off = ~torch.eye(t, dtype=torch.bool, device=m.device)
        out["dice"] = dice[:, off].mean()
        pair_sum = pair[:, off].sum(dim=1)  # (N,)
        weighted = (pair * dice)[:, off].sum(dim=1) / pair_sum.clamp_min(1e-12)
        out["weighted_dice"] = torch.where(pair_sum > 1e-12, weighted, 0.0).mean()
    else:
        out["dice"] = m.new_zeros(())
        out["weighted_dice"] = m.new_zeros(())
    out["tokens_eff"] = (1.0 / w_loss.square().sum(dim=1)).mean()
    if foreground is not None:
        share = _gt_share(m, w_loss, valid, foreground)
        if share is not None:
            out["gt_share"], out["gt_share_uniform"] = share
    if weights is not None:
        wt = weights.detach().double().clamp_min(1e-12)
        entropy = -(wt * wt.log()).sum(dim=1)  # (N,)
        out["weight_entropy"] = (entropy.mean() / math.log(t)).float() if t > 1 else m.new_zeros(())
    if combined is not None:
        combined = combined.detach().float().reshape(n, h * w) * valid[:, 0]  # (N, HW)
    elif weights is not None:
        combined = torch.einsum("ntp,nt->np", m, weights.detach().float())  # (N, HW)
    else:
        combined = m.sum(dim=1)  # (N, HW)
    out["combined"] = (combined.sum(dim=1) / area[:, 0]).mean()
    return {name: out[name] for name in STAT_NAMES if name in out}  # in the reports' order


def _gt_share(m, w_loss, valid, foreground):
    """(gt_share, gt_share_uniform) of the images with box cells, or None if none has any.

    Args:
        m: (N, T, HW) masks, zero outside ``valid``; w_loss: (N, T) weights as the loss applies
        them; valid: (N, 1, HW); foreground: (N, H, W) box cells.
    """
    n = m.shape[0]
    fg = foreground.reshape(n, -1).to(m) * valid[:, 0]  # (N, HW)
    has = fg.sum(dim=1) > 0
    if not bool(has.any()):
        return None
    # the per-cell loss weight of stage 2: sum_t w_t M_t^2 / sum_hw M_t
    cell = torch.einsum("nt,ntp->np", w_loss / m.sum(dim=2).clamp_min(1e-12), m.square())
    learned = (cell * fg).sum(dim=1) / cell.sum(dim=1).clamp_min(1e-12)  # (N,)
    uniform = fg.sum(dim=1) / valid[:, 0].sum(dim=1).clamp_min(1.0)  # (N,)
    return learned[has].mean(), uniform[has].mean()


def put_token_statistics(storage, stats: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Write every level's statistics to detectron2's event storage (one device sync).

    The names carry detectron2's ``[metric]`` tag, so the metric printer shows them beside the
    losses: ``[metric]tokens/<level>/<stat>``; ``metrics.json`` and tensorboard get them too.

    Args:
        storage: the EventStorage.
        stats: level -> :func:`token_statistics` of that level.

    Returns:
        the names written -> values.
    """
    names = [f"[metric]tokens/{lv}/{k}" for lv, s in stats.items() for k in s]
    if not names:
        return {}
    values = torch.stack([v.float() for s in stats.values() for v in s.values()]).tolist()
    out = dict(zip(names, values))
    for name, value in out.items():
        storage.put_scalar(name, value)
    return out


def put_level_statistics(
    storage,
    levels: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor], List[Tuple[int, int]]]],
    batched_inputs: List[dict],
    strides: Dict[str, int],
    combined: Optional[Dict[str, torch.Tensor]] = None,
) -> Dict[str, float]:
    """The :func:`token_statistics` of every level's masks of one training step, the ground
    truth of ``batched_inputs`` as foreground, written with :func:`put_token_statistics`.

    Args:
        storage: the EventStorage.
        levels: level -> (masks (N, T, H, W), weights (N, T) or None, N valid (h, w) at the
            level's resolution), without gradient.
        batched_inputs: the step's inputs (their ``instances`` give the foreground cells).
        strides: level -> stride.
        combined: level -> (N, H, W) what the teacher sees of each cell (stage 1), or None.

    Returns:
        the names written -> values.
    """
    combined = combined or {}
    stats = {
        lv: token_statistics(
            m,
            w,
            sizes,
            foreground=foreground_cells(batched_inputs, strides[lv], *m.shape[-2:]),
            combined=combined.get(lv),
        )
        for lv, (m, w, sizes) in levels.items()
    }
    return put_token_statistics(storage, stats)
