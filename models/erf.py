"""Effective receptive fields (Luo et al., NeurIPS 2016) and the ERF-adaptive soft-label weights of
Montage pre-training (Zhou et al., ECCV 2020, Sec. 3.3).

G[j, k] = |d sum_c X[b, c, j, k] / d image_b|, summed over RGB and averaged over the images: an (H, W)
map per feature position (j, k). The absolute value is taken per image, before averaging.

BatchNorm statistics (``bn_mode``). The images of a batch must be independent for the ERF to be a
per-image quantity, and a train-mode BatchNorm couples them through the batch statistics. Two exact,
per-image definitions are offered; in both the model runs in eval mode (dropout and drop-path off):

- "eval" (default): BatchNorm normalises with its running statistics, as the network is evaluated and
  fine-tuned (frozen BN in the detector). The ERF of a montage depends on that montage only.
- "train": every BatchNorm layer normalises with the per-channel mean and biased variance of its input
  over the ERF batch -- what a train-mode forward of that batch computes -- and these statistics are
  held as constants for the derivative. The derivative through the statistics is left out on purpose:
  it is not a spatial receptive field but a coupling of every pixel of every image of the batch
  (a share of 1 / (B * h_l * w_l) per pixel and layer) that depends on which images happen to share the
  batch; without it the images stay independent, the ERF is the mean of per-image ERFs under those
  statistics, and the cost is that of "eval" plus one no-grad forward. The running statistics are
  restored afterwards (running_mean / running_var / num_batches_tracked are unchanged).

Every method then runs ONE forward pass with independent images: the gradient of sum_b S[b, j, k]
w.r.t. the batch holds image b's own gradient in slot b, so one backward pass serves all images
exactly. What differs is how the h*w backward passes (one per feature position) are run:

- "loop": one ``autograd.grad`` per position over the retained graph (= ``compute_erf_bruteforce``).
- "vmap": ``autograd.grad(..., is_grads_batched=True)`` over chunks of one-hot output gradients. Exact
  with timm ResNets (eval BatchNorm, max-pool) on torch 2.14, but it runs on the legacy vmap, which has
  no batching rule for ``convolution_backward``, ``native_batch_norm_backward`` or
  ``max_pool2d_with_indices_backward`` and silently loops over the positions for them (see
  ``torch._C._debug_only_display_vmap_fallback_warnings(True)``), then stacks the slices.
- "func": ``torch.func.vjp`` + ``torch.func.vmap``: real batching rules, the positions are folded into
  the batch of each backward kernel.

No method reduces the arithmetic: an exact refresh costs about (images x h x w) input-gradient passes.
Batching only pays where the loop under-fills the device. Measured on CPU
(benchmarks/results/erf_refresh.md) the plain loop is the fastest ("vmap" and "func" add copies and
stacking to already compute-bound kernels), so "auto" uses the loop on CPU and "func" on CUDA (there
the loop launches h*w small backward passes; this choice is by design, not measured in this repo: run
the benchmark with ``--device cuda`` to check). "auto" falls back to the loop if "func" raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

ErfMethod = Literal["auto", "loop", "vmap", "func"]
METHODS: tuple[str, ...] = ("auto", "loop", "vmap", "func")
BatchNormMode = Literal["eval", "train"]
BN_MODES: tuple[str, ...] = ("eval", "train")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards (so a model that is
    training with, say, frozen BatchNorm layers gets exactly its previous state back)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


@contextmanager
def _batch_statistics(model: nn.Module, images: Tensor) -> Iterator[None]:
    """Within the block, every BatchNorm layer of ``model`` (already in eval mode) normalises with the
    per-channel mean and biased variance of its input on ``images``, held as constants (bn_mode "train",
    see the module docstring). They are found by one no-grad forward in which a pre-hook writes each
    layer's batch statistics into its running buffers just before it runs, so every layer sees inputs
    normalised upstream with batch statistics, as in a train-mode forward. The buffers are restored
    on exit. Layers without running statistics (``track_running_stats=False``) use batch statistics
    anyway, with the derivative through them: such models are not supported exactly."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]

    def use_batch_statistics(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        module.running_mean.copy_(x.mean(dim=dims))
        module.running_var.copy_(x.var(dim=dims, unbiased=False))

    try:
        handles = [m.register_forward_pre_hook(use_batch_statistics) for m in norms]
        try:
            with torch.no_grad():
                _feature_map(model, images)
        finally:
            for handle in handles:
                handle.remove()
        yield
    finally:
        for m, (mean, var) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@contextmanager
def _erf_context(model: nn.Module, images: Tensor, bn_mode: str) -> Iterator[None]:
    """Eval mode (restored afterwards), autograd on, and BatchNorm statistics chosen by ``bn_mode``."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn_mode!r}: use one of {BN_MODES}")
    with _eval_mode(model), torch.enable_grad():
        if bn_mode == "train":
            with _batch_statistics(model, images):
                yield
        else:
            yield


def _feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """Run the model and return its (B, C, h, w) feature map; for a model returning a list/tuple of maps
    (timm ``features_only``), the last one."""
    out = model(images)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise ValueError(
            "compute_erf needs a model returning a (B, C, h, w) feature map (or a list of them), got "
            f"{type(out).__name__}{'' if not isinstance(out, Tensor) else tuple(out.shape)}"
        )
    return out


def _check_images(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("compute_erf needs autograd: call it outside torch.inference_mode()")


def _reduce(grads: Tensor) -> Tensor:
    """(P, B, 3, H, W) input gradients -> (P, H, W): abs per image, sum over RGB, mean over images."""
    return grads.abs().sum(dim=2).mean(dim=1)


def resolve_method(method: str, device: torch.device) -> str:
    """The concrete method "auto" stands for on ``device`` ("func" on CUDA, "loop" elsewhere)."""
    if method not in METHODS:
        raise ValueError(f"unknown ERF method {method!r}: use one of {METHODS}")
    if method != "auto":
        return method
    return "func" if device.type == "cuda" else "loop"


def compute_erf(
    model: nn.Module,
    images: Tensor,
    *,
    chunk_size: int | None = None,
    method: ErfMethod = "auto",
    bn_mode: BatchNormMode = "eval",
) -> Tensor:
    """Exact ERF of every feature position: a tensor (h, w, H, W) on ``images.device``, float32.

    The model is evaluated in eval mode (each submodule's mode is restored afterwards) and no gradient
    is accumulated into any parameter's ``.grad`` (existing ones are left as they are).
    ``chunk_size`` caps how many positions share one batched backward pass for "vmap"/"func" (memory
    grows linearly with it; None = all h*w at once); the loop needs one position's memory only.
    ``method``: see the module docstring; "auto" = "func" on CUDA, "loop" elsewhere.
    ``bn_mode``: BatchNorm with its running statistics ("eval") or with the statistics of ``images``
    held constant ("train"); see the module docstring. The running statistics are left unchanged.
    """
    _check_images(images)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    concrete = resolve_method(method, images.device)
    with _erf_context(model, images, bn_mode):
        if concrete == "loop":
            return _erf_loop(model, images)
        try:
            return (_erf_func if concrete == "func" else _erf_vmap)(model, images, chunk_size)
        except RuntimeError as err:
            if method != "auto":
                raise
            warnings.warn(
                f"compute_erf: {concrete} failed ({err}); falling back to the per-position loop (same "
                "result)",
                RuntimeWarning,
                stacklevel=2,
            )
            return _erf_loop(model, images)


def _position_onehots(start: int, stop: int, s: Tensor) -> Tensor:
    """Output gradients (stop - start, B, h, w) of S = (B, h, w): a one at positions start..stop-1
    (row-major), for every image."""
    b, h, w = s.shape
    onehot = torch.zeros(stop - start, h * w, device=s.device, dtype=s.dtype)
    onehot[torch.arange(stop - start, device=s.device), torch.arange(start, stop, device=s.device)] = 1.0
    return onehot.view(-1, 1, h, w).expand(-1, b, h, w)


def _erf_chunked(s: Tensor, images: Tensor, chunk_size: int | None,
                 grads_of: Callable[[Tensor, bool], Tensor]) -> Tensor:
    """(h, w, H, W) ERF from ``grads_of(onehots, last)``: the input gradients (P, B, C, H, W) of the summed
    feature map ``s`` (B, h, w) for P one-hot position seeds, asked for in chunks of ``chunk_size``."""
    _, h, w = s.shape
    n = h * w
    step = n if chunk_size is None else chunk_size
    out = torch.empty(n, *images.shape[-2:], device=images.device, dtype=torch.float32)
    for start in range(0, n, step):
        stop = min(start + step, n)
        out[start:stop] = _reduce(grads_of(_position_onehots(start, stop, s.detach()), stop == n)).float()
    return out.view(h, w, *images.shape[-2:])


def _erf_vmap(model: nn.Module, images: Tensor, chunk_size: int | None) -> Tensor:
    x = images.detach().requires_grad_(True)
    s = _feature_map(model, x).sum(dim=1)  # (B, h, w)
    return _erf_chunked(s, images, chunk_size, lambda seeds, last: torch.autograd.grad(
        s, x, grad_outputs=seeds, is_grads_batched=True, retain_graph=not last)[0])


def _erf_func(model: nn.Module, images: Tensor, chunk_size: int | None) -> Tensor:
    s, vjp_fn = torch.func.vjp(lambda x: _feature_map(model, x).sum(dim=1), images.detach())
    return _erf_chunked(s, images, chunk_size, lambda seeds, last: torch.func.vmap(vjp_fn)(seeds)[0])


def _erf_loop(model: nn.Module, images: Tensor) -> Tensor:
    """One forward, then one plain ``autograd.grad`` per position (mode and grad mode set by caller)."""
    x = images.detach().requires_grad_(True)
    s = _feature_map(model, x).sum(dim=1)
    _, h, w = s.shape
    out = torch.empty(h, w, *images.shape[-2:], device=images.device, dtype=torch.float32)
    for j in range(h):
        for k in range(w):
            last = j == h - 1 and k == w - 1
            (g,) = torch.autograd.grad(s[:, j, k].sum(), x, retain_graph=not last)
            out[j, k] = _reduce(g.unsqueeze(0))[0].float()
    return out


def compute_erf_bruteforce(model: nn.Module, images: Tensor, *, bn_mode: BatchNormMode = "eval") -> Tensor:
    """The plain per-position ``autograd.grad`` loop (h, w, H, W), whatever the device. Same conventions
    as ``compute_erf``; for the benchmark (the tests check it against their own reference)."""
    _check_images(images)
    with _erf_context(model, images, bn_mode):
        return _erf_loop(model, images)


def position_regions_from_masks(region_masks: Tensor, feature_hw: tuple[int, int]) -> Tensor:
    """Region index (h, w) of each feature position: the mask that holds the input-space centre of the
    position's stride cell, ((j + 0.5) * H / h, (k + 0.5) * W / w), read off the masks (so any masks
    work). Where masks overlap the lowest index wins; a centre covered by no mask is an error."""
    if region_masks.dim() != 3:
        raise ValueError(f"region_masks must be (R, H, W), got shape {tuple(region_masks.shape)}")
    fh, fw = feature_hw
    big_h, big_w = region_masks.shape[-2:]
    dev = region_masks.device
    cy = ((torch.arange(fh, dtype=torch.float64, device=dev) + 0.5) * big_h / fh).floor().long()
    cx = ((torch.arange(fw, dtype=torch.float64, device=dev) + 0.5) * big_w / fw).floor().long()
    cy, cx = cy.clamp_max(big_h - 1), cx.clamp_max(big_w - 1)
    at_centres = region_masks[:, cy][:, :, cx] > 0  # (R, h, w)
    if not bool(at_centres.any(dim=0).all()):
        raise ValueError("some feature cell centres lie outside every region mask")
    return at_centres.int().argmax(dim=0)  # first True


def soft_label_weights(erf: Tensor, region_masks: Tensor, tau: float = 0.7) -> Tensor:
    """ERF-adaptive label weights (h, w, R) for the dense soft-label targets.

    For position (j, k) in region r (``position_regions_from_masks``), with E_i = sum(G . M^i):
        w_r = max(tau, E_r / sum(G)),   w_i = (1 - w_r) * E_i / sum_{i' != r} E_i'   (i != r).
    The denominator equals the paper's sum(G . (1 - M^r)) when the masks partition the canvas (as the
    montage layout's do); written this way the weights sum to 1 for any masks. Corner cases, without
    NaN: no ERF mass outside r -> one-hot on r; sum(G) == 0 -> one-hot on r. tau = 1 gives one-hot
    weights, i.e. the block-wise objective.
    """
    if erf.dim() != 4:
        raise ValueError(f"erf must be (h, w, H, W), got shape {tuple(erf.shape)}")
    if region_masks.dim() != 3 or region_masks.shape[-2:] != erf.shape[-2:]:
        raise ValueError(
            f"region_masks must be (R, H, W) with (H, W) = {tuple(erf.shape[-2:])}, "
            f"got {tuple(region_masks.shape)}"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    fh, fw = erf.shape[:2]
    g = erf.detach().double()
    m = (region_masks.to(device=erf.device) > 0).double()
    own = position_regions_from_masks(m, (fh, fw))  # (h, w)
    mass = torch.einsum("jkyx,ryx->jkr", g, m)  # E_i per position
    total = g.sum(dim=(-2, -1))  # (h, w)
    own_onehot = torch.nn.functional.one_hot(own, m.shape[0]).bool()  # (h, w, R)
    own_mass = (mass * own_onehot).sum(-1)
    other_mass = mass.masked_fill(own_onehot, 0.0)
    other_total = other_mass.sum(-1)

    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    w_own = torch.clamp(own_mass / safe_total, min=tau, max=1.0)
    has_other = (other_total > 0) & (total > 0)
    w_own = torch.where(has_other, w_own, torch.ones_like(w_own))
    safe_other = torch.where(has_other, other_total, torch.ones_like(other_total))
    weights = (1.0 - w_own)[..., None] * other_mass / safe_other[..., None]
    weights = torch.where(own_onehot, w_own[..., None], weights)
    return weights.to(erf.dtype if erf.is_floating_point() else torch.float32)

