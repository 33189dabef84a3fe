"""Label-based pixel-wise contrastive losses (Zhao et al., "Contrastive Learning for Label-Efficient
Semantic Segmentation", ICCV 2021, arXiv 2012.06985) as pure functions. Free of Lightning.

Inputs: unit features ``feats`` of image I and ``feats_distorted`` of its distorted view I^, both
(B, C, h, w) and used as given (the projection head normalises); ``labels`` (B, h, w) long at the same
resolution (``downsample_labels``), ``ignore_index`` pixels take no part. s_pq = f_p . f_q / T.

Two formulations (``formulation=``):

- ``"paper"`` (default), anchors p in I, keys in I^ (and J^ for cross-image)::

      loss_p = logsumexp_{k in D_p} s_pk - mean_{q in P_p} s_pq

  within-image: D_p = valid pixels of I^, P_p = pixels of I^ with label y_p; cross-image: D_p = valid
  pixels of I^ + pixels of J^ with label y_p, P_p = pixels of I^ and J^ with label y_p; batch: one bag,
  anchors all valid pixels of the batch's I views, keys all pixels of its I^ views. Per image the loss
  is the mean over its anchors that have a positive; images without such an anchor are left out of the
  mean over images (batch: the mean over all anchors of the bag).
- ``"official"``: the published TF code (google-research supervised_pixel_contrastive_loss) --
  per-positive denominator e_pq + sum over negatives, the self pair counts as a positive::

      loss_p = mean_{q in P_p} -log(e_pq / (e_pq + sum_{k in N_p} e_pk)) = mean_q softplus(lse_{N_p} - s_pq)

  mean over positives, then over anchors with at least one positive, then over ALL images of the batch
  (an image without valid anchors counts as 0, as ``tf.reduce_mean`` does). within-image: anchors and
  keys are the pixels of one view, computed for I and for I^ and summed (orig<->orig + aug<->aug);
  cross-image: anchors and keys are the pixels of I and of J^ (the code's ``features_orig`` and shuffled
  ``features_aug``; I^ takes no part), positives anywhere, negatives only in the anchor's own image;
  batch (not in the TF code): the within-image rule with the whole batch as one image, I and I^ summed.

Memory: the exact loss is computed in blocks of ``chunk_size`` anchor rows (each row needs its whole
row of similarities, so the log-sum-exp over a row is exact); under autograd each block is wrapped in
``torch.utils.checkpoint`` and recomputed in backward, so memory grows with B x chunk x N instead of
B x N^2. ``chunk_size=None`` computes all rows at once.

Subsampling (optional, ``max_pixels``): up to ``max_pixels`` valid pixels per image, the same positions
in I and I^ (``sample_pixels``: ``"random"`` or ``"balanced"``, i.e. round-robin over the classes present).

Under DDP ``gather_with_grad`` concatenates a tensor over ranks with gradients flowing back to its
owner; ``partner_views`` picks each image's cross-image partner J from the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = 255
FORMULATIONS = ("paper", "official")
LOSSES = ("within", "cross", "batch")
SAMPLING = ("random", "balanced")


# ------------------------------------------------------------------------------------------ labels
def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) label map -> (B, h, w) by nearest neighbour (the label at each cell's centre)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return out[:, 0].long()


def sample_pixels(labels: torch.Tensor, max_pixels: int, mode: str = "random", *, ignore_index: int = IGNORE_INDEX,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) labels -> (B, k) pixel indices, k = min(max_pixels, N): valid pixels first, in random order
    (``random``) or round-robin over the image's classes in random order within each class (``balanced``:
    every class present gets max_pixels / #classes pixels while it has them). When an image has fewer
    than k valid pixels the rest are ignore pixels (their labels stay ignore_index)."""
    if mode not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got '{mode}'")
    b, n = labels.shape
    k = min(int(max_pixels), n)
    rand = torch.rand(b, n, generator=generator, device="cpu").to(labels.device)
    valid = labels != ignore_index
    if mode == "random":
        key = rand + (~valid).float() * 2.0  # valid pixels (keys < 1) before ignored ones
    else:
        # rank of each pixel within its class (random order), then order by (rank, random).
        lab = torch.where(valid, labels, torch.full_like(labels, ignore_index)).long()
        order = torch.argsort(lab.double() * 2.0 + rand.double(), dim=1)  # grouped by class, random inside
        sorted_lab = torch.gather(lab, 1, order)
        pos = torch.arange(n, device=labels.device).expand(b, n)
        start = torch.where(torch.cat([torch.ones_like(sorted_lab[:, :1], dtype=torch.bool),
                                       sorted_lab[:, 1:] != sorted_lab[:, :-1]], 1), pos, torch.zeros_like(pos))
        start = torch.cummax(start, dim=1).values
        rank_sorted = (pos - start).double()
        rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
        key = rank + rand.double() * 0.5 + (~valid).double() * (2.0 * n + 2.0)
    return torch.argsort(key, dim=1)[:, :k]


def _flatten(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return feats.flatten(2).transpose(1, 2)


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, ...) at pixel indices idx (B, k)."""
    if idx is None:
        return x
    if x.ndim == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


# -------------------------------------------------------------------------------------- core rows
def _block_rows(anchors: torch.Tensor, keys: torch.Tensor, a_lab: torch.Tensor, k_lab: torch.Tensor,
                a_grp: torch.Tensor, k_grp: torch.Tensor, inv_t: float, official: bool,
                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bag (sum of anchor losses, number of anchors with a positive) over one block of anchor rows.

    anchors (B, r, C), keys (B, M, C), labels (B, r) / (B, M), groups (r,) / (M,) (which image of the
    bag a pixel belongs to)."""
    s = torch.bmm(anchors, keys.transpose(1, 2)) * inv_t  # (B, r, M)
    a_valid = (a_lab != ignore_index)[:, :, None]
    k_valid = (k_lab != ignore_index)[:, None, :]
    same = (a_lab[:, :, None] == k_lab[:, None, :]) & a_valid & k_valid
    n_pos = same.sum(-1)
    has_pos = n_pos > 0
    own_group = (a_grp[:, None] == k_grp[None, :])[None]
    if official:
        neg = a_valid & k_valid & ~same & own_group
        has_neg = neg.any(-1, keepdim=True)
        lse_neg = torch.logsumexp(s.masked_fill(~(neg | ~has_neg), float("-inf")), dim=-1, keepdim=True)
        lse_neg = lse_neg.masked_fill(~has_neg, float("-inf"))
        per_pair = F.softplus(lse_neg - s, threshold=30.0)  # -log(e_pq / (e_pq + sum_neg e_pk))
        rows = (per_pair * same).sum(-1) / n_pos.clamp(min=1)
    else:
        den = (k_valid & (own_group | same)) | ~has_pos[..., None]  # a row without positives: any finite value
        lse = torch.logsumexp(s.masked_fill(~den, float("-inf")), dim=-1)
        rows = lse - (s * same).sum(-1) / n_pos.clamp(min=1)
    rows = torch.where(has_pos, rows, torch.zeros_like(rows))
    return rows.sum(-1), has_pos.sum(-1)


def _bag_rows(anchors: torch.Tensor, keys: torch.Tensor, a_lab: torch.Tensor, k_lab: torch.Tensor,
              a_grp: torch.Tensor, k_grp: torch.Tensor, *, temperature: float, official: bool, ignore_index: int,
              chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed anchor losses and (B,) anchor counts, computed in row blocks of `chunk_size`."""
    inv_t = 1.0 / float(temperature)
    n = anchors.shape[1]
    if chunk_size is None or chunk_size >= n:
        return _block_rows(anchors, keys, a_lab, k_lab, a_grp, k_grp, inv_t, official, ignore_index)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    grad = torch.is_grad_enabled() and (anchors.requires_grad or keys.requires_grad)
    total = anchors.new_zeros(anchors.shape[0])
    count = torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device)
    for i in range(0, n, chunk_size):
        sl = slice(i, i + chunk_size)
        args = (anchors[:, sl], keys, a_lab[:, sl], k_lab, a_grp[sl], k_grp, inv_t, official, ignore_index)
        if grad:  # recompute the block's B x chunk x M similarities in backward instead of keeping them
            s, c = checkpoint(_block_rows, *args, use_reentrant=False)
        else:
            s, c = _block_rows(*args)
        total = total + s
        count = count + c
    return total, count


def _check(formulation: str, feats: torch.Tensor, labels: torch.Tensor, *others: torch.Tensor) -> bool:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got '{formulation}'")
    if feats.ndim != 4 or labels.ndim != 3:
        raise ValueError(f"expected feats (B, C, h, w) and labels (B, h, w), got {tuple(feats.shape)}, {tuple(labels.shape)}")
    if tuple(labels.shape) != (feats.shape[0], *feats.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match feats {tuple(feats.shape)}: downsample the "
                         "labels to the feature resolution (downsample_labels)")
    for t in others:
        if t.shape[0] != feats.shape[0] or t.shape[-2:] != feats.shape[-2:]:
            raise ValueError(f"all inputs must share batch and spatial size; got {tuple(t.shape)} vs {tuple(feats.shape)}")
    return formulation == "official"


def _mean_over_images(total: torch.Tensor, count: torch.Tensor, official: bool) -> torch.Tensor:
    per_image = total / count.clamp(min=1)
    if official:  # TF: reduce_mean over the batch, images without valid anchors count as 0
        return per_image.mean()
    has = count > 0
    if not bool(has.any()):
        return total.sum() * 0.0  # keeps the graph; no valid anchor anywhere
    return per_image[has].mean()


def _subsample(labels_flat: torch.Tensor, max_pixels: int | None, sampling: str, ignore_index: int,
               generator: torch.Generator | None) -> torch.Tensor | None:
    if max_pixels is None or max_pixels >= labels_flat.shape[1]:
        return None
    return sample_pixels(labels_flat, max_pixels, sampling, ignore_index=ignore_index, generator=generator)


def _two_views(feats: torch.Tensor, feats_distorted: torch.Tensor, labels: torch.Tensor, max_pixels: int | None,
               sampling: str, ignore_index: int, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, C) features of I and I^ and (B, N) labels, flattened and, with ``max_pixels``, subsampled at
    the same pixels in both views."""
    f, fd, lab = _flatten(feats), _flatten(feats_distorted), labels.flatten(1)
    idx = _subsample(lab, max_pixels, sampling, ignore_index, generator)
    return _take(f, idx), _take(fd, idx), _take(lab, idx)


def _two_view_loss(f: torch.Tensor, fd: torch.Tensor, lab: torch.Tensor, official: bool, *, temperature: float,
                   ignore_index: int, chunk_size: int | None) -> torch.Tensor:
    """One bag per row of (f, fd, lab) (an image, or the whole batch flattened into one row): the paper's
    anchors of I against keys of I^, or the TF code's orig<->orig + aug<->aug pairs, summed."""
    grp = torch.zeros(lab.shape[1], dtype=torch.long, device=lab.device)
    kw = dict(temperature=temperature, official=official, ignore_index=ignore_index, chunk_size=chunk_size)
    if official:
        loss = 0.0
        for view in (f, fd):
            total, count = _bag_rows(view, view, lab, lab, grp, grp, **kw)
            loss = loss + _mean_over_images(total, count, True)
        return loss
    total, count = _bag_rows(f, fd, lab, lab, grp, grp, **kw)
    return _mean_over_images(total, count, False)


# ------------------------------------------------------------------------------------ public losses
def within_image_loss(feats: torch.Tensor, feats_distorted: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float = 0.07, ignore_index: int = IGNORE_INDEX, formulation: str = "paper",
                      chunk_size: int | None = None, max_pixels: int | None = None, sampling: str = "random",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Within-image loss, averaged over images (see the module docstring)."""
    official = _check(formulation, feats, labels, feats_distorted)
    f, fd, lab = _two_views(feats, feats_distorted, labels, max_pixels, sampling, ignore_index, generator)
    return _two_view_loss(f, fd, lab, official, temperature=temperature, ignore_index=ignore_index,
                          chunk_size=chunk_size)


def cross_image_loss(feats: torch.Tensor, feats_distorted: torch.Tensor, labels: torch.Tensor,
                     feats_other: torch.Tensor, labels_other: torch.Tensor, *, temperature: float = 0.07,
                     ignore_index: int = IGNORE_INDEX, formulation: str = "paper", chunk_size: int | None = None,
                     max_pixels: int | None = None, sampling: str = "random",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-image loss: positives also from J^ (``feats_other``, labels ``labels_other``), negatives only
    from the anchor's own image; averaged over images (see the module docstring)."""
    official = _check(formulation, feats, labels, feats_distorted, feats_other, labels_other)
    f, fd, lab = _flatten(feats), _flatten(feats_distorted), labels.flatten(1)
    fo, lab_o = _flatten(feats_other), labels_other.flatten(1)
    idx = _subsample(lab, max_pixels, sampling, ignore_index, generator)
    idx_o = _subsample(lab_o, max_pixels, sampling, ignore_index, generator)
    f, fd, lab, fo, lab_o = _take(f, idx), _take(fd, idx), _take(lab, idx), _take(fo, idx_o), _take(lab_o, idx_o)
    n, m = lab.shape[1], lab_o.shape[1]
    dev = lab.device
    grp = torch.cat([torch.zeros(n, dtype=torch.long, device=dev), torch.ones(m, dtype=torch.long, device=dev)])
    kw = dict(temperature=temperature, official=official, ignore_index=ignore_index, chunk_size=chunk_size)
    if official:  # anchors and keys: the pixels of I and of J^
        both, both_lab = torch.cat([f, fo], 1), torch.cat([lab, lab_o], 1)
        total, count = _bag_rows(both, both, both_lab, both_lab, grp, grp, **kw)
    else:  # anchors I; keys I^ (group 0) and J^ (group 1)
        keys, keys_lab = torch.cat([fd, fo], 1), torch.cat([lab, lab_o], 1)
        total, count = _bag_rows(f, keys, lab, keys_lab, grp[:n], grp, **kw)
    return _mean_over_images(total, count, official)


def batch_loss(feats: torch.Tensor, feats_distorted: torch.Tensor, labels: torch.Tensor, *,
               temperature: float = 0.07, ignore_index: int = IGNORE_INDEX, formulation: str = "paper",
               chunk_size: int | None = None, max_pixels: int | None = None, sampling: str = "random",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Batch loss: all pixels of the mini-batch as one bag (see the module docstring)."""
    official = _check(formulation, feats, labels, feats_distorted)
    f, fd, lab = _two_views(feats, feats_distorted, labels, max_pixels, sampling, ignore_index, generator)
    f, fd, lab = f.reshape(1, -1, f.shape[-1]), fd.reshape(1, -1, fd.shape[-1]), lab.reshape(1, -1)
    return _two_view_loss(f, fd, lab, official, temperature=temperature, ignore_index=ignore_index,
                          chunk_size=chunk_size)


def pixel_contrastive_loss(kind: str, feats: torch.Tensor, feats_distorted: torch.Tensor, labels: torch.Tensor,
                           feats_other: torch.Tensor | None = None, labels_other: torch.Tensor | None = None,
                           **kwargs) -> torch.Tensor:
    """Dispatch on ``kind`` in ("within", "cross", "batch")."""
    if kind == "within":
        return within_image_loss(feats, feats_distorted, labels, **kwargs)
    if kind == "cross":
        if feats_other is None or labels_other is None:
            raise ValueError("the cross-image loss needs feats_other and labels_other (the partner's distorted view)")
        return cross_image_loss(feats, feats_distorted, labels, feats_other, labels_other, **kwargs)
    if kind == "batch":
        return batch_loss(feats, feats_distorted, labels, **kwargs)
    raise ValueError(f"loss must be one of {LOSSES}, got '{kind}'")


# ------------------------------------------------------------------------------------------- DDP
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) over the ranks along dim 0, gradients flowing back
    (``torch.distributed.nn.functional.all_gather``: its backward sums each slice's gradient over the ranks, as
    every rank's loss may use every rank's tensor). Identity without an initialised process group. With the DDP
    gradient average over ranks, the resulting gradients equal those of the mean of the per-rank losses
    computed on one process."""
    world, _ = _world()
    if world == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), 0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    world, _ = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def partner_shift(global_batch: int, step: int, seed: int = 0) -> int:
    """The cross-image partner of global image g is (g + shift) mod G, shift drawn in 1..G-1 from
    (seed, step): the same on every rank, never the image itself (0 when G == 1)."""
    if global_batch <= 1:
        return 0
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return int(torch.randint(1, global_batch, (1,), generator=g))


def partner_views(feats_distorted: torch.Tensor, labels: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats_other, labels_other) for this rank's images: the distorted view and labels of image
    (g + shift) mod G of the global batch (gathered over ranks, with gradients)."""
    world, rank = _world()
    all_feats = gather_with_grad(feats_distorted)
    all_labels = gather_no_grad(labels)
    b = feats_distorted.shape[0]
    idx = (torch.arange(b, device=labels.device) + rank * b + int(shift)) % (b * world)
    return all_feats[idx], all_labels[idx]
