"""The training FLOP counter against a hand count for a small conv net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cheaplunch.flops import StepFlops, count_flops, measure_step_flops, training_step_flops


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10, bias=False))


def _hand_forward(batch: int) -> tuple[int, int, int]:
    """Multiply-adds x 2 of each layer for a (batch, 3, 16, 16) input."""
    conv1 = 2 * batch * 8 * 16 * 16 * (3 * 3 * 3)    # 8 output maps of 16x16, 27 MACs each
    conv2 = 2 * batch * 16 * 8 * 8 * (8 * 3 * 3)     # stride 2: 8x8 outputs, 72 MACs each
    linear = 2 * batch * 10 * (16 * 8 * 8)
    return conv1, conv2, linear


def test_forward_flops_equal_hand_count():
    net, x = _net(), torch.randn(4, 3, 16, 16)
    assert count_flops(lambda: net(x)) == sum(_hand_forward(4))


def test_training_step_flops_equal_hand_count():
    """Backward: a gradient for every weight (as many FLOPs as its forward) and a gradient for every
    layer's input except the first (the image needs none)."""
    net, x, y = _net(), torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    conv1, conv2, linear = _hand_forward(4)
    expected = (conv1 + conv2 + linear) + (conv1 + conv2 + linear) + (conv2 + linear)
    got = training_step_flops(lambda: nn.functional.cross_entropy(net(x), y), net.parameters())
    assert got == expected
    assert all(p.grad is None for p in net.parameters())  # the count leaves no gradients behind


class _Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def compute_losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": nn.functional.cross_entropy(self.net(x), y)}


def test_measure_step_flops_mean_over_batches_and_extrapolation():
    module = _Module()
    batches = [(torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,))) for b in (2, 4)]
    per_image = 3 * sum(_hand_forward(1)) - _hand_forward(1)[0]  # fwd + weight grads + input grads (not conv1)
    got = measure_step_flops(module, batches, accumulate=2)
    assert got == StepFlops(per_step=2 * 3 * per_image, min_per_step=2 * 2 * per_image,
                            max_per_step=2 * 4 * per_image, measured_steps=2)
    assert got.total(100) == pytest.approx(100 * 6 * per_image)
