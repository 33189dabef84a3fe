"""Montage objectives against hand-written oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.heads import DenseClassifier
from models.montage_canvas import POSITIONS, MontageLayout
from models.montage_losses import blockwise_loss, erf_dense_loss, global_loss, soft_cross_entropy

K = 6  # 5 object classes + background


@pytest.fixture
def setup() -> tuple[torch.Tensor, torch.Tensor, MontageLayout, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    layout = MontageLayout((224, 224))
    logits = torch.randn(3, K, 7, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 5], [3, 3, 4, 0], [5, 5, 5, 5]])
    return logits, labels, layout, layout.position_regions((7, 7))


def test_soft_ce_matches_torch() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, K, 3, 5, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, K, 3, 5, generator=g, dtype=torch.float64), dim=1)
    for red in ("mean", "sum", "none"):
        assert torch.allclose(
            soft_cross_entropy(logits, probs, reduction=red), F.cross_entropy(logits, probs, reduction=red)
        )
    hard = torch.randint(0, K, (4, 3, 5), generator=g)
    onehot = F.one_hot(hard, K).permute(0, 3, 1, 2).double()
    assert torch.allclose(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, hard))
    # along a different dim
    flat = logits.permute(0, 2, 3, 1)
    assert torch.allclose(
        soft_cross_entropy(flat, probs.permute(0, 2, 3, 1), dim=-1), F.cross_entropy(logits, probs)
    )


def test_soft_ce_equals_the_two_formulas_it_replaces() -> None:
    """``soft_cross_entropy`` (F.cross_entropy with probability targets) gives the numbers of the two
    hand-written soft cross-entropies it replaced, run here inline on random inputs: the Montage one
    (-sum p log_softmax along ``dim``, then the reduction) and the distillation one (batch mean along
    the last dim with the logits in float32; class indices go to F.cross_entropy)."""

    def montage_formula(logits, probs, dim=1, reduction="mean"):
        loss = -(probs * F.log_softmax(logits, dim=dim)).sum(dim=dim)
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]

    def distillation_formula(logits, target):
        if target.ndim == 1:
            return F.cross_entropy(logits, target)
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        for shape, dim in (((5, K, 4, 3), 1), ((5, 4, 3, K), -1), ((5, 4, K, 3), 2), ((8, K), 1)):
            logits = 3 * torch.randn(shape, generator=g, dtype=dtype)
            probs = torch.softmax(torch.randn(shape, generator=g, dtype=dtype), dim=dim)
            for red in ("none", "mean", "sum"):
                torch.testing.assert_close(soft_cross_entropy(logits, probs, dim=dim, reduction=red),
                                           montage_formula(logits, probs, dim, red))
        logits = 3 * torch.randn(16, K, generator=g, dtype=dtype)
        mixed = torch.softmax(torch.randn(16, K, generator=g, dtype=dtype), dim=-1)
        hard = torch.randint(0, K, (16,), generator=g)
        torch.testing.assert_close(soft_cross_entropy(logits, mixed), distillation_formula(logits, mixed).to(dtype))
        torch.testing.assert_close(soft_cross_entropy(logits, hard), distillation_formula(logits, hard))
    low = (3 * torch.randn(16, K, generator=g)).to(torch.bfloat16)  # taken in float32, as the distillation copy did
    torch.testing.assert_close(soft_cross_entropy(low, mixed.float()), distillation_formula(low, mixed.float()))
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(logits, mixed[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(logits, mixed, reduction="batchmean")


def test_global_loss_area_mix(setup) -> None:
    logits, labels, layout, _ = setup
    areas = layout.region_areas()
    pooled = logits.mean(dim=(2, 3))
    expected = []
    for b in range(labels.shape[0]):
        target = torch.zeros(K, dtype=torch.float64)
        for i in range(4):
            target[labels[b, i]] += areas[i]
        assert torch.isclose(target.sum(), torch.tensor(1.0, dtype=torch.float64))
        expected.append(-(target * torch.log_softmax(pooled[b], 0)).sum())
    assert torch.allclose(global_loss(logits, labels, areas), torch.stack(expected).mean())
    # a montage of one repeated label is plain CE on that label
    same = torch.full((1, 4), 2)
    assert torch.allclose(global_loss(logits[:1], same, areas), F.cross_entropy(pooled[:1], same[:, 0]))


def test_blockwise_matches_loop(setup) -> None:
    logits, labels, _, regions = setup
    per_region = []
    for r in range(4):
        rows, cols = torch.nonzero(regions == r, as_tuple=True)
        pooled = logits[:, :, rows, cols].mean(-1)
        per_region.append(F.cross_entropy(pooled, labels[:, r]))
    assert torch.allclose(blockwise_loss(logits, labels, regions), torch.stack(per_region).mean())


def test_blockwise_skips_empty_regions_and_raises_if_all_empty() -> None:
    logits = torch.randn(2, K, 1, 1)
    labels = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    regions = MontageLayout((224, 224)).position_regions((1, 1))  # only bottom_right
    with pytest.warns(RuntimeWarning, match="without positions"):
        loss = blockwise_loss(logits, labels, regions)
    assert torch.allclose(loss, F.cross_entropy(logits[:, :, 0, 0], labels[:, 3]))
    with pytest.raises(ValueError):
        blockwise_loss(logits, labels, torch.full((1, 1), 7))


def _onehot_weights(regions: torch.Tensor) -> torch.Tensor:
    return F.one_hot(regions, 4).double()


def test_erf_dense_tau1_is_block_mean_of_hard_ce(setup) -> None:
    logits, labels, _, regions = setup
    loss, logs = erf_dense_loss(logits, labels, _onehot_weights(regions), regions)
    blocks = []
    for r in range(4):
        vals = []
        for b in range(logits.shape[0]):
            for j in range(7):
                for k in range(7):
                    if regions[j, k] == r:
                        vals.append(-torch.log_softmax(logits[b, :, j, k], 0)[labels[b, r]])
        blocks.append(torch.stack(vals).mean())
    assert torch.allclose(loss, torch.stack(blocks).mean())
    assert torch.allclose(logs["hard_ce"], loss)
    assert torch.isclose(logs["own_weight"], torch.tensor(1.0, dtype=torch.float64))
    for r, name in enumerate(POSITIONS):
        assert torch.allclose(logs[f"block/{name}"], blocks[r])


def test_erf_dense_equals_blockwise_for_regionwise_constant_logits(setup) -> None:
    _, labels, _, regions = setup
    per_region = torch.randn(3, K, 4, dtype=torch.float64)
    logits = per_region[:, :, regions]  # constant within each region
    loss, _ = erf_dense_loss(logits, labels, _onehot_weights(regions), regions)
    assert torch.allclose(loss, blockwise_loss(logits, labels, regions))


def test_erf_dense_soft_target_by_hand(setup) -> None:
    logits, labels, _, regions = setup
    g = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(7, 7, 4, generator=g, dtype=torch.float64), -1)
    loss, _ = erf_dense_loss(logits, labels, weights, regions)
    block_sum, block_n = torch.zeros(4, dtype=torch.float64), torch.zeros(4)
    for b in range(3):
        for j in range(7):
            for k in range(7):
                target = torch.zeros(K, dtype=torch.float64)
                for i in range(4):
                    target[labels[b, i]] += weights[j, k, i]
                ce = -(target * torch.log_softmax(logits[b, :, j, k], 0)).sum()
                block_sum[regions[j, k]] += ce
                block_n[regions[j, k]] += 1
    assert torch.allclose(loss, (block_sum / block_n).mean())


def test_gradients_flow_through_head(setup) -> None:
    _, labels, layout, regions = setup
    head = DenseClassifier(16, K)
    feats = torch.randn(3, 16, 7, 7, requires_grad=True)
    weights = torch.full((7, 7, 4), 0.1) + 0.6 * F.one_hot(regions, 4)
    for loss in (
        global_loss(head(feats), labels, layout.region_areas()),
        blockwise_loss(head(feats), labels, regions),
        erf_dense_loss(head(feats), labels, weights, regions)[0],
    ):
        head.zero_grad()
        feats.grad = None
        loss.backward()
        assert torch.isfinite(loss)
        assert head.conv.weight.grad is not None and head.conv.weight.grad.abs().sum() > 0
        assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_dense_classifier_shape() -> None:
    head = DenseClassifier(8, K)
    assert head(torch.randn(2, 8, 5, 3)).shape == (2, K, 5, 3)
    assert head.background_index == K - 1
    with pytest.raises(ValueError):
        DenseClassifier(8, 1)
