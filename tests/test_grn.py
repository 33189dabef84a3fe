"""GRN: identity at init, equal to timm's GlobalResponseNorm without a mask, and with a mask equal to
GRN applied to the visible positions alone (statistics from visible positions only, per sample)."""

import pytest
import torch
from timm.layers.grn import GlobalResponseNorm

from models.grn import GRN, global_response_norm


def _random_grn(dim: int, seed: int = 0) -> GRN:
    g = torch.Generator().manual_seed(seed)
    grn = GRN(dim)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(grn.gamma.shape, generator=g))
        grn.beta.copy_(torch.randn(grn.beta.shape, generator=g))
    return grn


def test_interface_and_identity_at_init():
    grn = GRN(8)
    assert dict(grn.named_parameters()).keys() == {"gamma", "beta"}
    assert grn.gamma.shape[-1] == 8 and grn.gamma.numel() == 8 and grn.beta.numel() == 8
    x = torch.randn(2, 5, 6, 8)
    assert torch.equal(grn(x), x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_timm_without_mask(channels_last):
    dim = 16
    ours = _random_grn(dim)
    theirs = GlobalResponseNorm(dim, channels_last=channels_last)
    with torch.no_grad():
        theirs.weight.copy_(ours.gamma.flatten())
        theirs.bias.copy_(ours.beta.flatten())
    x = torch.randn(3, 7, 5, dim)
    if channels_last:
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    else:
        xc = x.permute(0, 3, 1, 2)
        out = global_response_norm(xc, theirs.weight, theirs.bias, channels_last=False)
        torch.testing.assert_close(out, theirs(xc), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.permute(0, 2, 3, 1), ours(x), rtol=1e-6, atol=1e-6)


def test_formula_by_hand():
    grn = _random_grn(4, seed=3)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    gx = (x**2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    expected = grn.gamma.double() * (x * nx) + grn.beta.double() + x
    torch.testing.assert_close(grn.double()(x), expected)


def test_mask_equals_grn_on_visible_positions_alone():
    """Per sample, a different set of visible positions: the visible outputs equal GRN over a tensor
    holding only those positions (gathered as a 1 x K 'image'), and masked values do not matter."""
    dim = 8
    grn = _random_grn(dim, seed=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, dim, generator=g)
    mask = torch.rand(3, 4, 6, generator=g) < 0.6
    mask[0, 0, 0] = False  # every sample keeps a visible position
    out = grn(x, mask)
    for n in range(3):
        vis = ~mask[n]
        alone = grn(x[n][vis].reshape(1, 1, -1, dim))  # the visible positions only
        torch.testing.assert_close(out[n][vis], alone.reshape(-1, dim), rtol=1e-6, atol=1e-6)
    noisy = x.clone()
    noisy[mask] = torch.randn(int(mask.sum()), dim, generator=g) * 100
    out2 = grn(noisy, mask.float())  # 0/1 float masks work too
    assert torch.equal(out2[~mask], out[~mask])


def test_all_visible_mask_is_plain_grn():
    grn = _random_grn(8, seed=2)
    x = torch.randn(2, 3, 4, 8)
    assert torch.equal(grn(x, torch.zeros(2, 3, 4)), grn(x))


def test_gradients_do_not_flow_from_masked_statistics():
    grn = _random_grn(4, seed=4)
    x = torch.randn(1, 3, 3, 4, requires_grad=True)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 1:, :] = True
    out = grn(x, mask)
    out[~mask].sum().backward()
    assert x.grad[mask].abs().sum() == 0
