"""ERF computation against references written in the tests (tests/erf_reference.py: per image and
per position on a fresh graph; an all-ones conv stack counted by hand with numpy), the BatchNorm mode
switch, and the ERF-adaptive weights against the paper's formula written plainly."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn

from common.images import erf_heatmap_grid
from models.erf import (
    compute_erf,
    compute_erf_bruteforce,
    position_regions_from_masks,
    soft_label_weights,
)
from models.montage_canvas import POSITIONS, MontageLayout
from tests.erf_reference import literal_soft_label_weights, reference_erf, with_batch_statistics

# every way models/erf.py computes an ERF: compute_erf's methods and the brute-force loop
ERF_METHODS = ["loop", "vmap", "func", "auto", "bruteforce"]


def _erf(net: nn.Module, images: torch.Tensor, method: str, **kwargs: Any) -> torch.Tensor:
    """The ERF from models/erf.py by ``method`` (one of ERF_METHODS)."""
    if method == "bruteforce":
        kwargs.pop("chunk_size", None)
        return compute_erf_bruteforce(net, images, **kwargs)
    return compute_erf(net, images, method=method, **kwargs)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Same shape and max |a - b| within ``rel`` of max |b|."""
    b = b.to(a.dtype)
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


@pytest.fixture(scope="module")
def small_cnn_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The small CNN, 3 images and their reference ERF (computed once for all methods)."""
    net = _small_cnn()
    images = torch.randn(3, 3, 32, 28, generator=torch.Generator().manual_seed(1))
    return net, images, reference_erf(net, images)


# ---------------------------------------------------------------- ERF against the references


def _box3_same(a: np.ndarray) -> np.ndarray:
    """3x3 box sum of a 2-D array, zero outside (a 'same' convolution with an all-ones kernel)."""
    padded = np.pad(a, 1)
    return sum(padded[dy : dy + a.shape[0], dx : dx + a.shape[1]] for dy in range(3) for dx in range(3))


@pytest.mark.parametrize("method", ERF_METHODS)
def test_all_ones_conv_stack_by_hand(method: str) -> None:
    """Two all-ones 3x3 convs, no nonlinearity: conv1 3->2 channels (stride 1, padding 1), conv2 2->4
    (stride 2, padding 1). d sum_c X[j, k] / d x[rgb, y, x] = 4 * 2 * (number of conv1 outputs p inside
    the image with |p - (2j, 2k)|_inf <= 1 and |(y, x) - p|_inf <= 1), i.e. a 3x3 box of the (clipped)
    3x3 box around (2j, 2k); summed over RGB: 3 * 8 * count. Interior: outer([1,2,3,2,1], [1,2,3,2,1])."""
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.Conv2d(2, 4, 3, stride=2, padding=1))
    nn.init.ones_(net[0].weight)
    nn.init.ones_(net[1].weight)
    nn.init.normal_(net[1].bias)
    big_h, big_w = 11, 13
    fh, fw = 6, 7
    expected = np.zeros((fh, fw, big_h, big_w))
    for j in range(fh):
        for k in range(fw):
            conv1_window = np.zeros((big_h, big_w))
            conv1_window[max(2 * j - 1, 0) : 2 * j + 2, max(2 * k - 1, 0) : 2 * k + 2] = 1
            expected[j, k] = 3 * 8 * _box3_same(conv1_window)
    binomial = np.array([1, 2, 3, 2, 1])
    np.testing.assert_array_equal(expected[2, 3, 2:7, 4:9], 24 * np.outer(binomial, binomial))  # (4, 6) +- 2
    assert expected[2, 3].sum() == 24 * 81
    images = torch.randn(2, 3, big_h, big_w)
    erf = _erf(net, images, method, chunk_size=5)
    assert torch.equal(erf, torch.from_numpy(expected).float())
    assert torch.equal(reference_erf(net, images), torch.from_numpy(expected))  # the reference agrees


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@pytest.mark.parametrize("method", ERF_METHODS)
def test_small_cnn_matches_reference(
    small_cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor], chunk_size: int | None, method: str
) -> None:
    """Max-pool, strided convs and BatchNorm (running statistics): every method equals the per-image,
    per-position reference; the ERF of a batch is the mean of the single images' ERFs."""
    net, images, ref = small_cnn_case
    assert ref.shape == (4, 4, 32, 28)
    assert _close(_erf(net, images, method, chunk_size=chunk_size), ref)


@pytest.mark.parametrize("method", ERF_METHODS)
@pytest.mark.parametrize("features_only", [False, True])
def test_timm_resnet18_matches_reference(features_only: bool, method: str) -> None:
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
    ref = reference_erf(net, images)
    assert ref.shape == (2, 2, 64, 64)
    assert _close(_erf(net, images, method, chunk_size=3), ref)


def test_abs_taken_per_image() -> None:
    """For x * x the gradient 2x flips sign with the image: a batch [x, -x] would cancel to zero if signed
    gradients were averaged; with |.| per image it equals the ERF of x alone, 2|x| pooled (2x2 mean)."""

    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.avg_pool2d(x * x, 2)

    x = torch.rand(1, 3, 4, 4) + 0.1
    erf = compute_erf(Square(), torch.cat([x, -x]))
    expected = torch.zeros(2, 2, 4, 4)
    for j in range(2):
        for k in range(2):
            window = (slice(2 * j, 2 * j + 2), slice(2 * k, 2 * k + 2))
            expected[j, k][window] = (2 * x[0].abs() / 4).sum(0)[window]
    assert _close(erf, expected)
    assert _close(erf, reference_erf(Square(), torch.cat([x, -x])))


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_mode_restored_and_no_param_grads(bn_mode: str) -> None:
    net = _small_cnn()
    net.train()
    net[1].eval()  # a frozen BN inside a training model must stay frozen, the rest training
    modes = [m.training for m in net.modules()]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # works from a no_grad context (e.g. a validation hook)
        for method in ("vmap", "func", "loop"):
            compute_erf(net, images, method=method, bn_mode=bn_mode)
        compute_erf_bruteforce(net, images, bn_mode=bn_mode)
    assert [m.training for m in net.modules()] == modes
    assert all(p.grad is None for p in net.parameters())
    # existing grads (mid-step) are left untouched
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    compute_erf(net, images, chunk_size=2, bn_mode=bn_mode)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())


def test_eval_mode_uses_running_statistics() -> None:
    """bn_mode "eval" (the default), whatever mode the model is in: BatchNorm with its running
    statistics, i.e. the reference ERF of the eval-mode network, and the model's mode is kept."""
    net = _small_cnn()
    images = torch.randn(4, 3, 16, 16)
    ref = reference_erf(net, images)  # runs an eval-mode copy
    assert _close(compute_erf(net.train(), images), ref)
    assert _close(compute_erf(net, images, bn_mode="eval"), ref)
    assert net.training


@pytest.mark.parametrize("method", ERF_METHODS)
def test_train_mode_uses_the_erf_batch_statistics(method: str) -> None:
    """bn_mode "train": BatchNorm normalises with the statistics of the ERF batch (as a train-mode
    forward of that batch does), held constant: the reference ERF of a copy whose running statistics
    are those batch statistics. That differs from the eval-mode ERF, and the running statistics (and
    the BatchNorm's counter) are unchanged afterwards."""
    net = _small_cnn()
    net.train()
    images = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    batch_stats_net = with_batch_statistics(net, images)
    with torch.no_grad():  # the copy reproduces the train-mode forward of this batch
        torch.testing.assert_close(batch_stats_net(images), copy.deepcopy(net).train()(images), rtol=1e-4,
                                   atol=1e-5)
    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(buffers) == 6

    erf = _erf(net, images, method, chunk_size=4, bn_mode="train")

    assert _close(erf, reference_erf(batch_stats_net, images))
    eval_erf = reference_erf(net, images)
    assert not _close(erf, eval_erf, rel=0.05)  # the switch changes the result
    for key, value in net.state_dict().items():
        if key in buffers:
            assert torch.equal(value, buffers[key]), key
    assert net.training and all(m.training for m in net.modules())


def test_unknown_bn_mode_is_an_error() -> None:
    net = _small_cnn()
    with pytest.raises(ValueError, match="BatchNorm mode"):
        compute_erf(net, torch.randn(1, 3, 16, 16), bn_mode="batch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- soft-label weights


@pytest.mark.parametrize("canvas", [(224, 224), (97, 131)])
@pytest.mark.parametrize("fhw", [(1, 1), (2, 3), (7, 7), (13, 9), (14, 14), (56, 56)])
def test_regions_of_feature_positions_against_brute_force(canvas: tuple[int, int], fhw: tuple[int, int]) -> None:
    """Each position's region is the cell box (x, y, w, h) holding the centre of its stride cell, found here by
    testing every box."""
    layout = MontageLayout(canvas)
    boxes = [layout.cell_boxes()[p] for p in POSITIONS]
    expected = torch.zeros(fhw, dtype=torch.long)
    for j in range(fhw[0]):
        for k in range(fhw[1]):
            cy, cx = (j + 0.5) * canvas[0] / fhw[0], (k + 0.5) * canvas[1] / fhw[1]
            expected[j, k] = next(i for i, (x, y, w, h) in enumerate(boxes) if x <= cx < x + w and y <= cy < y + h)
    assert torch.equal(layout.position_regions(fhw), expected)
    assert torch.equal(position_regions_from_masks(layout.region_masks(), fhw), expected)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
def test_weights_match_literal_formula(tau: float) -> None:
    layout = MontageLayout((32, 32))
    masks = layout.region_masks()
    g = torch.rand(7, 7, 32, 32, generator=torch.Generator().manual_seed(0)) ** 4
    wts = soft_label_weights(g, masks, tau=tau)
    own = layout.position_regions((7, 7))
    assert torch.allclose(wts.double(), literal_soft_label_weights(g, masks, own, tau), atol=1e-6)
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
    assert _close(erf, reference_erf(net, images))
