"""Test-side references for the ERF and the ERF-adaptive soft labels, written from the definitions
(Luo et al. 2016; Zhou et al. 2020, Sec. 3.3) without any function of models/erf.py, so that the tests
compare models/erf.py with something it does not share code with. Slow on purpose: plain Python loops.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _last_map(out: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


def reference_erf(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ERF (h, w, H, W) by the definition: for every image and every feature position (j, k), a fresh
    forward of that image ALONE and one backward of sum_c X[c, j, k]; |d/d image| summed over RGB, then
    averaged over the images. Runs a deep copy of ``model`` in eval mode (so ``model`` is untouched)."""
    net = copy.deepcopy(model).eval()
    per_image = []
    for image in images:
        with torch.no_grad():
            fh, fw = _last_map(net(image[None])).shape[-2:]
        erf = torch.zeros(fh, fw, *images.shape[-2:], dtype=torch.float64)
        for j in range(fh):
            for k in range(fw):
                x = image[None].detach().clone().requires_grad_(True)
                score = _last_map(net(x))[0, :, j, k].sum()
                (grad,) = torch.autograd.grad(score, x)
                erf[j, k] = grad[0].abs().sum(dim=0).double()
        per_image.append(erf)
    return torch.stack(per_image).mean(dim=0)


def with_batch_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` whose BatchNorm running statistics are the batch statistics a
    TRAIN-mode forward of ``images`` normalises with (per channel: mean and biased variance of each BN
    layer's input, recorded by hooks on a train-mode copy). Its forward on ``images`` reproduces the
    train-mode forward, with the statistics as constants."""
    recorder = copy.deepcopy(model).train()
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

        return hook

    for name, module in recorder.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        recorder(images)
    frozen = copy.deepcopy(model).eval()
    for name, module in frozen.named_modules():
        if name in stats:
            module.running_mean.copy_(stats[name][0])
            module.running_var.copy_(stats[name][1])
    assert stats, "the model has no BatchNorm2d layer"
    return frozen


def literal_soft_label_weights(
    g: torch.Tensor, masks: torch.Tensor, own: torch.Tensor, tau: float
) -> torch.Tensor:
    """The paper's formula, written plainly, one position at a time: for position (j, k) in region r,
    w_r = max(tau, sum(G . M^r) / sum(G)) and w_i = (1 - w_r) sum(G . M^i) / sum(G . (1 - M^r))."""
    h, w = g.shape[:2]
    m = masks.double()
    out = torch.zeros(h, w, m.shape[0], dtype=torch.float64)
    for j in range(h):
        for k in range(w):
            gjk, r = g[j, k].double(), int(own[j, k])
            w_r = max(tau, float((gjk * m[r]).sum() / gjk.sum()))
            out[j, k, r] = w_r
            for i in range(m.shape[0]):
                if i != r:
                    out[j, k, i] = (1 - w_r) * (gjk * m[i]).sum() / (gjk * (1 - m[r])).sum()
    return out
