"""ERF computation against a per-position loop and a hand-derivable net; ERF-adaptive weights by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn

from models.erf import (
    compute_erf,
    compute_erf_bruteforce,
    erf_heatmap_grid,
    position_regions_from_masks,
    soft_label_weights,
)
from models.layout import MontageLayout


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= rel * b.abs().max().clamp_min(1e-12))


def _small_cnn() -> nn.Module:
    """Strided convs, BatchNorm with non-trivial running statistics, max-pool."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, stride=1, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def test_ones_conv_by_hand() -> None:
    """One 3x3 conv, all-ones kernel, stride 2, padding 1, C=4 outputs: d sum_c X[j,k] / d x[rgb,y,x] = C
    on the (clipped) window rows 2j-1..2j+1, cols 2k-1..2k+1; summed over RGB -> 3C there, 0 elsewhere."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    nn.init.ones_(conv.weight)
    nn.init.normal_(conv.bias)
    images = torch.randn(2, 3, 9, 11)
    erf = compute_erf(conv, images)
    h, w = 5, 6
    expected = torch.zeros(h, w, 9, 11)
    for j in range(h):
        for k in range(w):
            expected[j, k, max(2 * j - 1, 0) : 2 * j + 2, max(2 * k - 1, 0) : 2 * k + 2] = 3 * 4
    assert torch.equal(erf, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("method", ["vmap", "func", "loop", "auto"])
def test_small_cnn_matches_bruteforce(chunk_size: int | None, method: str) -> None:
    net = _small_cnn()
    images = torch.randn(3, 3, 32, 28)
    ref = compute_erf_bruteforce(net, images)
    assert ref.shape == (4, 4, 32, 28)
    assert _close(compute_erf(net, images, chunk_size=chunk_size, method=method), ref)


def test_batch_equals_mean_of_single_images() -> None:
    """Independent of the sum-over-batch trick: the ERF of a batch is the mean of per-image ERFs."""
    net = _small_cnn()
    images = torch.randn(3, 3, 32, 32)
    per_image = torch.stack([compute_erf_bruteforce(net, images[i : i + 1]) for i in range(3)]).mean(0)
    assert _close(compute_erf(net, images), per_image)


def test_abs_taken_per_image() -> None:
    """For x * x the gradient 2x flips sign with the image: a batch [x, -x] would cancel to zero if signed
    gradients were averaged; with |.| per image it equals the ERF of x alone."""

    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.avg_pool2d(x * x, 2)

    x = torch.rand(1, 3, 4, 4) + 0.1
    erf = compute_erf(Square(), torch.cat([x, -x]))
    assert _close(erf, compute_erf(Square(), x))
    assert erf.sum() > 0


@pytest.mark.parametrize("features_only", [False, True])
def test_timm_resnet18_matches_bruteforce(features_only: bool) -> None:
    torch.manual_seed(0)
    if features_only:
        net = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(3, 4))
    else:
        net = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    for m in net.modules():  # BatchNorm with non-trivial running stats
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    images = torch.randn(2, 3, 64, 64)
    ref = compute_erf_bruteforce(net, images)
    assert ref.shape == (2, 2, 64, 64)
    assert _close(compute_erf(net, images, method="vmap", chunk_size=3), ref)
    assert _close(compute_erf(net, images, method="func"), ref)


def test_mode_restored_and_no_param_grads() -> None:
    net = _small_cnn()
    net.train()
    net[1].eval()  # a frozen BN inside a training model must stay frozen, the rest training
    modes = [m.training for m in net.modules()]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # works from a no_grad context (e.g. a validation hook)
        for method in ("vmap", "func", "loop"):
            compute_erf(net, images, method=method)
        compute_erf_bruteforce(net, images)
    assert [m.training for m in net.modules()] == modes
    assert all(p.grad is None for p in net.parameters())
    # existing grads (mid-step) are left untouched
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    compute_erf(net, images, chunk_size=2)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())


def test_eval_mode_is_used() -> None:
    """In train mode BatchNorm would mix the images; the result must equal the pure eval-mode ERF."""
    net = _small_cnn()
    images = torch.randn(4, 3, 16, 16)
    ref = compute_erf_bruteforce(net.eval(), images)
    assert _close(compute_erf(net.train(), images), ref)
    assert net.training


# ---------------------------------------------------------------- soft-label weights


@pytest.mark.parametrize("canvas", [(224, 224), (97, 131)])
@pytest.mark.parametrize("fhw", [(1, 1), (2, 3), (7, 7), (13, 9), (14, 14), (56, 56)])
def test_regions_from_masks_match_layout(canvas: tuple[int, int], fhw: tuple[int, int]) -> None:
    layout = MontageLayout(canvas)
    assert torch.equal(position_regions_from_masks(layout.region_masks(), fhw), layout.position_regions(fhw))


def _literal_weights(g: torch.Tensor, masks: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's formula, written plainly, one position at a time."""
    h, w = g.shape[:2]
    out = torch.zeros(h, w, masks.shape[0], dtype=torch.float64)
    for j in range(h):
        for k in range(w):
            gjk, r = g[j, k].double(), int(own[j, k])
            w_r = max(tau, float((gjk * masks[r]).sum() / gjk.sum()))
            out[j, k, r] = w_r
            for i in range(masks.shape[0]):
                if i != r:
                    out[j, k, i] = (1 - w_r) * (gjk * masks[i]).sum() / (gjk * (1 - masks[r])).sum()
    return out


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
def test_weights_match_literal_formula(tau: float) -> None:
    layout = MontageLayout((32, 32))
    masks = layout.region_masks()
    g = torch.rand(7, 7, 32, 32, generator=torch.Generator().manual_seed(0)) ** 4
    wts = soft_label_weights(g, masks, tau=tau)
    own = layout.position_regions((7, 7))
    assert torch.allclose(wts.double(), _literal_weights(g, masks.double(), own, tau), atol=1e-6)
    assert torch.allclose(wts.sum(-1), torch.ones(7, 7), atol=1e-6)
    w_own = wts.gather(-1, own[..., None])[..., 0]
    assert bool((w_own >= tau - 1e-6).all())
    if tau == 1.0:
        assert torch.equal(wts, nn.functional.one_hot(own, 4).float())


def test_uniform_erf_gives_area_weights() -> None:
    """G uniform over the canvas: w_r = max(tau, area_r), w_i = (1 - w_r) * area_i / (1 - area_r)."""
    layout = MontageLayout((50, 50), split=(0.4, 0.4))
    areas = layout.region_areas().double()  # 0.16, 0.24, 0.24, 0.36
    g = torch.ones(5, 5, 50, 50)
    own = layout.position_regions((5, 5))
    for tau in (0.2, 0.3, 0.7):
        wts = soft_label_weights(g, layout.region_masks(), tau=tau)
        for j in range(5):
            for k in range(5):
                r = int(own[j, k])
                w_r = max(tau, float(areas[r]))
                expected = (1 - w_r) * areas / (1 - areas[r])
                expected[r] = w_r
                assert torch.allclose(wts[j, k].double(), expected, atol=1e-6)
    # tau = 0.2: bottom_right (area 0.36 > tau) keeps its area share
    assert torch.isclose(soft_label_weights(g, layout.region_masks(), tau=0.2)[4, 4, 3], torch.tensor(0.36))


def test_weights_corner_cases() -> None:
    layout = MontageLayout((20, 20), split=(0.5, 0.5))
    masks = layout.region_masks()
    own = layout.position_regions((2, 2))  # [[0, 1], [2, 3]]
    onehot = nn.functional.one_hot(own, 4).float()
    # zero ERF everywhere -> one-hot on own region
    assert torch.equal(soft_label_weights(torch.zeros(2, 2, 20, 20), masks), onehot)
    # ERF entirely inside the own region -> one-hot (no 0/0)
    g = masks[own.flatten()].view(2, 2, 20, 20).clone()
    assert torch.equal(soft_label_weights(g, masks, tau=0.5), onehot)
    # ERF entirely in another region (top_left's mass all in bottom_right): w_r = tau, rest to that region
    g = torch.zeros(2, 2, 20, 20)
    g[0, 0] = masks[3]
    g[1, 1] = masks[3]
    wts = soft_label_weights(g, masks, tau=0.7)
    assert torch.allclose(wts[0, 0], torch.tensor([0.7, 0.0, 0.0, 0.3]))
    assert torch.equal(wts[0, 1], onehot[0, 1])  # zero G
    assert not torch.isnan(wts).any()


def test_weights_with_arbitrary_masks() -> None:
    """Three vertical stripes; a position's own stripe is read off the masks."""
    masks = torch.zeros(3, 6, 9)
    masks[0, :, :2], masks[1, :, 2:7], masks[2, :, 7:] = 1, 1, 1
    g = torch.ones(1, 3, 6, 9)
    wts = soft_label_weights(g, masks, tau=0.5)
    # cell centres x = 1.5, 4.5, 7.5 -> stripes 0, 1, 2; areas 2/9, 5/9, 2/9
    assert torch.allclose(wts[0, 0], torch.tensor([0.5, 0.5 * 5 / 7, 0.5 * 2 / 7]))
    assert torch.allclose(wts[0, 1], torch.tensor([2 / 9, 5 / 9, 2 / 9]))
    assert torch.allclose(wts.sum(-1), torch.ones(1, 3))


def test_weights_from_a_real_erf() -> None:
    net = _small_cnn()
    layout = MontageLayout((32, 32))
    erf = compute_erf(net, torch.randn(2, 3, 32, 32))
    wts = soft_label_weights(erf, layout.region_masks(), tau=0.7)
    assert wts.shape == (4, 4, 4)
    assert torch.allclose(wts.sum(-1), torch.ones(4, 4), atol=1e-6)
    own = layout.position_regions((4, 4))
    assert bool((wts.gather(-1, own[..., None]) >= 0.7 - 1e-6).all())


def test_heatmap_grid() -> None:
    erf = torch.rand(4, 4, 32, 32)
    img = erf_heatmap_grid(erf, region_masks=MontageLayout((32, 32)).region_masks())
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.shape == (32, 5 * 32 + 4 * 2, 3)
    assert erf_heatmap_grid(torch.zeros(1, 1, 8, 8)).shape == (8, 8, 3)


def test_auto_method_resolution_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import erf as erf_module

    assert erf_module.resolve_method("auto", torch.device("cpu")) == "loop"
    assert erf_module.resolve_method("auto", torch.device("cuda")) == "func"
    with pytest.raises(ValueError):
        compute_erf(_small_cnn(), torch.randn(1, 3, 16, 16), method="nope")  # type: ignore[arg-type]

    class OldStyleRelu(torch.autograd.Function):  # no setup_context: torch.func cannot transform it
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return g * (x > 0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return OldStyleRelu.apply(self.conv(x))

    net, images = Net(), torch.randn(2, 3, 15, 15)
    with pytest.raises(RuntimeError):
        compute_erf(net, images, method="func")
    monkeypatch.setattr(erf_module, "resolve_method", lambda method, device: "func")
    with pytest.warns(RuntimeWarning, match="falling back"):
        erf = compute_erf(net, images)
    assert _close(erf, compute_erf_bruteforce(net, images))
