"""The three Montage pre-training objectives (Zhou et al., ECCV 2020, Sec. 3.3) as pure functions of
dense logits (B, K, h, w) from ``DenseClassifier``, montage labels (B, R) (R = 4 cells, POSITIONS
order) and the layout's tensors. All use soft-label cross-entropy.

- ``global_loss``: one prediction per montage, target = area-weighted mix of its labels (CutMix-like).
- ``blockwise_loss``: one prediction per region (logits pooled over its positions), its own label.
- ``erf_dense_loss``: a prediction per position against the ERF-weighted mix of the labels, averaged
  within each region's block, then over the blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from models.montage_canvas import POSITIONS


def soft_cross_entropy(logits: Tensor, target: Tensor, dim: int = 1, reduction: str = "mean") -> Tensor:
    """-sum_k p_k log softmax(logits)_k along ``dim`` (the class dim), by ``F.cross_entropy`` with class
    probability targets: ``target`` is a float tensor of the shape of ``logits`` (mixed, smoothed or
    ERF-weighted labels), or integer class indices (``logits`` without ``dim``; plain cross-entropy).
    ``reduction`` as ``F.cross_entropy``: "none" keeps the other dims, "mean" averages over them, "sum"
    adds them. float16 / bfloat16 logits are taken in float32, as autocast does for this loss.
    The one soft cross-entropy of the project (Montage objectives, distillation, mixup)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if target.is_floating_point():
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ")
        target = target.to(logits.dtype).movedim(dim, 1)
    return F.cross_entropy(logits.movedim(dim, 1), target, reduction=reduction)


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, h, w), got {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, R) with B = {logits.shape[0]}, got {tuple(labels.shape)}")


def _region_names(n: int) -> tuple[str, ...]:
    return POSITIONS if n == len(POSITIONS) else tuple(f"region{i}" for i in range(n))


def _region_onehot(position_regions: Tensor, num_regions: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(R, h*w) float membership of each position and the (R,) bool "region has positions"."""
    idx = position_regions.to(like.device).flatten().long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_regions):
        raise ValueError(
            f"position_regions must hold region indices in [0, {num_regions}), got {idx.unique().tolist()}"
        )
    onehot = F.one_hot(idx, num_regions).T.to(like.dtype)
    present = onehot.sum(dim=1) > 0
    if not bool(present.any()):
        raise ValueError("no region holds any feature position")
    if not bool(present.all()):
        warnings.warn(
            f"feature map {tuple(position_regions.shape)} leaves regions "
            f"{[n for n, p in zip(_region_names(num_regions), present.tolist()) if not p]} without "
            "positions; they are skipped",
            RuntimeWarning,
            stacklevel=3,
        )
    return onehot, present


def global_loss(logits: Tensor, labels: Tensor, region_areas: Tensor) -> Tensor:
    """Soft CE of the globally pooled logits (B, K) against the area-weighted mix of the R labels
    (areas renormalised to sum to 1; a repeated label gets the sum of its cells' areas)."""
    _check(logits, labels)
    areas = region_areas.to(device=logits.device, dtype=logits.dtype)
    areas = areas / areas.sum()
    target = torch.zeros(logits.shape[:2], device=logits.device, dtype=logits.dtype)
    target.scatter_add_(1, labels.long(), areas.expand(labels.shape[0], -1).contiguous())
    return soft_cross_entropy(logits.mean(dim=(2, 3)), target)


def blockwise_loss(logits: Tensor, labels: Tensor, position_regions: Tensor) -> Tensor:
    """Mean over regions of the CE of the region-pooled logits (B, K) against the region's own label.
    Regions with no feature position (tiny maps) are skipped with a warning; all empty raises."""
    _check(logits, labels)
    b, k = logits.shape[:2]
    r = labels.shape[1]
    member, present = _region_onehot(position_regions, r, logits)
    pooled = torch.einsum("bkp,rp->brk", logits.flatten(2), member) / member.sum(1).clamp_min(1)[:, None]
    ce = F.cross_entropy(pooled.reshape(b * r, k), labels.reshape(-1).long(), reduction="none")
    return ce.view(b, r).mean(0)[present].mean()


def erf_dense_loss(
    logits: Tensor, labels: Tensor, weights: Tensor, position_regions: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """ERF-adaptive dense classification loss.

    Target at (j, k): sum_i weights[j, k, i] * onehot(labels[:, i]) (weights from
    ``soft_label_weights``, (h, w, R)). Per-position soft CE (B, h, w), averaged within each region's
    block (over the batch and the block's positions), then over the blocks that hold positions.

    Returns ``(loss, logs)``; ``logs`` holds detached scalars: ``block/<position>`` the block mean CE of
    each present block, ``own_weight`` the mean own-region weight over positions, ``hard_ce`` the
    per-position CE against the own region's hard label, block-averaged the same way (what tau = 1
    would train, for comparison).
    """
    _check(logits, labels)
    b, k, h, w = logits.shape
    r = labels.shape[1]
    if weights.shape != (h, w, r):
        raise ValueError(f"weights must be (h, w, R) = {(h, w, r)}, got {tuple(weights.shape)}")
    if position_regions.shape != (h, w):
        raise ValueError(f"position_regions must be (h, w) = {(h, w)}, got {tuple(position_regions.shape)}")
    wts = weights.to(device=logits.device, dtype=logits.dtype)
    label_onehot = F.one_hot(labels.long(), k).to(logits.dtype)  # (B, R, K)
    target = torch.einsum("brk,hwr->bkhw", label_onehot, wts)
    ce_map = soft_cross_entropy(logits, target, reduction="none").flatten(1)  # (B, h*w)

    member, present = _region_onehot(position_regions, r, logits)
    counts = member.sum(1).clamp_min(1)

    def block_means(per_position: Tensor) -> Tensor:  # (B, h*w) -> (R,)
        return (per_position @ member.T).mean(0) / counts

    blocks = block_means(ce_map)
    loss = blocks[present].mean()

    with torch.no_grad():
        own = position_regions.to(logits.device).flatten().long()  # (h*w,)
        hard_target = labels.long()[:, own]  # (B, h*w)
        log_p = F.log_softmax(logits.detach().flatten(2), dim=1)
        hard_ce = -log_p.gather(1, hard_target[:, None]).squeeze(1)
        logs = {
            f"block/{name}": blocks[i].detach() for i, name in enumerate(_region_names(r)) if bool(present[i])
        }
        logs["own_weight"] = wts.flatten(0, 1).gather(1, own[:, None]).mean()
        logs["hard_ce"] = block_means(hard_ce)[present].mean()
    return loss, logs
