"""Pixel-wise contrastive losses against a plain O(N^2) reference written here (loops over images and
anchors), chunked == unchunked (values and gradients), gradcheck, subsampling, label downsampling, the
projection head, and (slow) the 2-process gather equivalence."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from models.pixel_contrastive import (
    batch_loss,
    cross_image_loss,
    downsample_labels,
    partner_shift,
    partner_views,
    sample_pixels,
    within_image_loss,
)
from models.projection import ProjectionHead

IGN = 255


# --------------------------------------------------------------------------------- naive reference
def _pixels(feats, labels, b):
    """list of (feature vector, label) of image b, row-major."""
    f = feats[b].reshape(feats.shape[1], -1).t()
    return [(f[i], int(labels[b].reshape(-1)[i])) for i in range(f.shape[0])]


def _paper_anchor(p, keys, t):
    """keys: list of (vec, label, in_denominator_always). Returns the anchor loss or None (no positive)."""
    fp, yp = p
    pos = [fk for fk, yk, _ in keys if yk == yp and yk != IGN]
    if yp == IGN or not pos:
        return None
    den = sum(math.exp(float(fk @ fp) / t) for fk, yk, own in keys if yk != IGN and (own or yk == yp))
    return -sum(math.log(math.exp(float(fq @ fp) / t) / den) for fq in pos) / len(pos)


def _official_anchor(p, pix, t):
    """pix: list of (vec, label, group); p = (vec, label, group) taken from pix (the self pair included)."""
    fp, yp, gp = p
    if yp == IGN:
        return None
    pos = [fq for fq, yq, _ in pix if yq == yp]
    neg = sum(math.exp(float(fk @ fp) / t) for fk, yk, gk in pix if yk != IGN and yk != yp and gk == gp)
    if not pos:
        return None
    terms = []
    for fq in pos:
        e = math.exp(float(fq @ fp) / t)
        terms.append(-math.log(e / (e + neg)))
    return sum(terms) / len(terms)


def _mean(xs):
    return sum(xs) / len(xs)


def naive_within(f, fd, lab, t, formulation):
    B = f.shape[0]
    if formulation == "paper":
        per_image = []
        for b in range(B):
            keys = [(v, y, True) for v, y in _pixels(fd, lab, b)]
            losses = [x for x in (_paper_anchor(p, keys, t) for p in _pixels(f, lab, b)) if x is not None]
            if losses:
                per_image.append(_mean(losses))
        return _mean(per_image)
    total = 0.0
    for view in (f, fd):
        per_image = []
        for b in range(B):
            pix = [(v, y, 0) for v, y in _pixels(view, lab, b)]
            losses = [x for x in (_official_anchor(p, pix, t) for p in pix) if x is not None]
            per_image.append(_mean(losses) if losses else 0.0)
        total += _mean(per_image)
    return total


def naive_cross(f, fd, lab, fo, lab_o, t, formulation):
    B = f.shape[0]
    per_image = []
    for b in range(B):
        if formulation == "paper":
            keys = [(v, y, True) for v, y in _pixels(fd, lab, b)] + [(v, y, False) for v, y in _pixels(fo, lab_o, b)]
            losses = [x for x in (_paper_anchor(p, keys, t) for p in _pixels(f, lab, b)) if x is not None]
            if losses:
                per_image.append(_mean(losses))
        else:
            pix = [(v, y, 0) for v, y in _pixels(f, lab, b)] + [(v, y, 1) for v, y in _pixels(fo, lab_o, b)]
            losses = [x for x in (_official_anchor(p, pix, t) for p in pix) if x is not None]
            per_image.append(_mean(losses) if losses else 0.0)
    return _mean(per_image)


def naive_batch(f, fd, lab, t, formulation):
    B = f.shape[0]
    anchors = [p for b in range(B) for p in _pixels(f, lab, b)]
    if formulation == "paper":
        keys = [(v, y, True) for b in range(B) for v, y in _pixels(fd, lab, b)]
        return _mean([x for x in (_paper_anchor(p, keys, t) for p in anchors) if x is not None])
    total = 0.0
    for view in (f, fd):
        pix = [(v, y, 0) for b in range(B) for v, y in _pixels(view, lab, b)]
        total += _mean([x for x in (_official_anchor(p, pix, t) for p in pix) if x is not None])
    return total


# ------------------------------------------------------------------------------------------- data
def _unit(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(shape, generator=g, dtype=dtype), dim=1)


def _case(seed=0, dtype=torch.float64):
    """4 images of 3x3: ignore pixels; class 3 only in image 0, class 4 only in image 2 (and image 2's
    partner); image 1 a single class; image 3 entirely ignored."""
    labels = torch.tensor([
        [[0, 0, 1], [1, 3, 3], [IGN, 2, 2]],
        [[1, 1, 1], [1, 1, 1], [1, 1, IGN]],
        [[4, 4, 0], [2, IGN, 0], [2, 2, 1]],
        [[IGN] * 3] * 3,
    ])
    f = _unit((4, 5, 3, 3), seed, dtype)
    fd = F.normalize(f + 0.3 * _unit((4, 5, 3, 3), seed + 1, dtype), dim=1)
    perm = torch.tensor([1, 2, 0, 0])  # partners J of each image
    return f, fd, labels, fd[perm], labels[perm]


FORMS = ["paper", "official"]
CHUNKS = [None, 1, 4]


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_within_matches_naive(formulation, chunk, t):
    f, fd, lab, _, _ = _case()
    got = within_image_loss(f, fd, lab, temperature=t, formulation=formulation, chunk_size=chunk)
    assert got.item() == pytest.approx(naive_within(f, fd, lab, t, formulation), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_cross_matches_naive(formulation, chunk, t):
    f, fd, lab, fo, lab_o = _case(1)
    got = cross_image_loss(f, fd, lab, fo, lab_o, temperature=t, formulation=formulation, chunk_size=chunk)
    assert got.item() == pytest.approx(naive_cross(f, fd, lab, fo, lab_o, t, formulation), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_batch_matches_naive(formulation, chunk):
    f, fd, lab, _, _ = _case(2)
    got = batch_loss(f, fd, lab, temperature=0.2, formulation=formulation, chunk_size=chunk)
    assert got.item() == pytest.approx(naive_batch(f, fd, lab, 0.2, formulation), rel=1e-9, abs=1e-9)


def test_single_class_image_and_ignored_image():
    f, fd, lab, _, _ = _case(3)
    # official: a single-class image has no negatives -> every -log(e/(e+0)) is 0
    assert within_image_loss(f[1:2], fd[1:2], lab[1:2], formulation="official").item() == pytest.approx(0.0, abs=1e-12)
    # paper: all keys are positives -> lse - mean >= 0, and > 0 unless all similarities are equal
    assert within_image_loss(f[1:2], fd[1:2], lab[1:2]).item() > 0
    # an entirely ignored image: left out of the paper's mean, a 0 in the official mean; finite gradient
    x = f[3:4].clone().requires_grad_(True)
    for form in FORMS:
        loss = within_image_loss(x, fd[3:4], lab[3:4], formulation=form, chunk_size=2)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all() and (g == 0).all()
    # official averages over all images (ignored one = 0); paper over images with anchors
    both = within_image_loss(f[2:4], fd[2:4], lab[2:4], formulation="official")
    one = within_image_loss(f[2:3], fd[2:3], lab[2:3], formulation="official")
    assert both.item() == pytest.approx(one.item() / 2)
    assert within_image_loss(f[2:4], fd[2:4], lab[2:4]).item() == pytest.approx(within_image_loss(f[2:3], fd[2:3], lab[2:3]).item())


@pytest.mark.parametrize("kind", ["within", "cross", "batch"])
@pytest.mark.parametrize("formulation", FORMS)
def test_chunked_equals_full_with_gradients(kind, formulation):
    torch.manual_seed(0)
    B, C, h, w = 2, 8, 6, 5
    lab = torch.randint(0, 4, (B, h, w))
    lab[0, 0, :3] = IGN
    base = [F.normalize(torch.randn(B, C, h, w), dim=1) for _ in range(3)]
    results = []
    for chunk in (None, 7):
        xs = [t.clone().requires_grad_(True) for t in base]
        kw = dict(formulation=formulation, chunk_size=chunk)
        if kind == "within":
            loss = within_image_loss(xs[0], xs[1], lab, **kw)
        elif kind == "cross":
            loss = cross_image_loss(xs[0], xs[1], lab, xs[2], lab.flip(0), **kw)
        else:
            loss = batch_loss(xs[0], xs[1], lab, **kw)
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
        results.append((loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("formulation", FORMS)
def test_gradcheck(formulation):
    f, fd, lab, fo, lab_o = _case(4)
    f, fd, fo = (t[:3, :3, :2, :3].clone().requires_grad_(True) for t in (f, fd, fo))  # unnormalised: fine
    lab, lab_o = lab[:3, :2, :3], lab_o[:3, :2, :3]

    def fn(a, b, c):
        return (within_image_loss(a, b, lab, temperature=0.5, formulation=formulation, chunk_size=2)
                + cross_image_loss(a, b, lab, c, lab_o, temperature=0.5, formulation=formulation, chunk_size=4)
                + batch_loss(a, b, lab, temperature=0.5, formulation=formulation, chunk_size=5))

    assert torch.autograd.gradcheck(fn, (f, fd, fo), eps=1e-6, atol=1e-5)


def test_sampling_random_and_balanced():
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([[0] * 20 + [1] * 3 + [2] * 1 + [IGN] * 8])
    idx = sample_pixels(lab, 9, "balanced", generator=g)
    chosen = lab[0, idx[0]].tolist()
    assert sorted(chosen) == [0] * 5 + [1] * 3 + [2]  # round-robin: class 2 and 1 fully, then class 0
    assert len(set(idx[0].tolist())) == 9
    idx = sample_pixels(lab, 24, "random", generator=g)
    assert IGN not in lab[0, idx[0]].tolist() and len(set(idx[0].tolist())) == 24
    idx = sample_pixels(lab, 30, "random", generator=g)  # more than the 24 valid pixels: ignore ones follow
    assert lab[0, idx[0]].tolist().count(IGN) == 6
    a = sample_pixels(lab, 9, "balanced", generator=torch.Generator().manual_seed(5))
    b = sample_pixels(lab, 9, "balanced", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_subsampled_loss_is_the_loss_of_the_chosen_pixels():
    f, fd, lab, _, _ = _case(5)
    full = within_image_loss(f, fd, lab, max_pixels=9)  # >= N: no subsampling
    assert full.item() == pytest.approx(within_image_loss(f, fd, lab).item())
    idx = sample_pixels(lab.flatten(1), 4, "random", generator=torch.Generator().manual_seed(1))
    pick = lambda t: torch.gather(t.flatten(2), 2, idx[:, None].expand(-1, t.shape[1], -1))[..., None]  # noqa: E731
    expected = within_image_loss(pick(f), pick(fd), torch.gather(lab.flatten(1), 1, idx)[..., None])
    got = within_image_loss(f, fd, lab, max_pixels=4, generator=torch.Generator().manual_seed(1))
    assert got.item() == pytest.approx(expected.item())


def test_downsample_labels_nearest():
    lab = torch.arange(64).reshape(1, 8, 8)
    out = downsample_labels(lab, (2, 2))
    assert out.dtype == torch.long and out.tolist() == [[[lab[0, 2, 2].item(), lab[0, 2, 6].item()],
                                                         [lab[0, 6, 2].item(), lab[0, 6, 6].item()]]]
    lab = torch.full((1, 4, 4), IGN)
    assert (downsample_labels(lab, (2, 2)) == IGN).all()


def test_errors():
    f, fd, lab, fo, lab_o = _case()
    with pytest.raises(ValueError, match="formulation"):
        within_image_loss(f, fd, lab, formulation="nope")
    with pytest.raises(ValueError, match="downsample"):
        within_image_loss(f, fd, lab[:, :2])


def test_projection_head_shape_and_unit_norm():
    head = ProjectionHead(32, dim=256, layers=3)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.kernel_size == (1, 1) and c.out_channels == 256 for c in convs)
    assert sum(isinstance(m, torch.nn.ReLU) for m in head.modules()) == 2
    out = head(torch.randn(2, 32, 5, 7))
    assert out.shape == (2, 256, 5, 7)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)


def test_partner_shift():
    assert partner_shift(1, 5) == 0
    shifts = {partner_shift(4, s, seed=1) for s in range(50)}
    assert shifts <= {1, 2, 3} and len(shifts) > 1
    assert partner_shift(8, 3, 2) == partner_shift(8, 3, 2)
    # single process: partner_views is a plain roll of the batch
    fd, lab = torch.arange(4.0).view(4, 1, 1, 1), torch.arange(4).view(4, 1, 1)
    fo, lo = partner_views(fd, lab, 3)
    assert fo.flatten().tolist() == [3.0, 0.0, 1.0, 2.0] and lo.flatten().tolist() == [3, 0, 1, 2]


# ------------------------------------------------------------------------------------ DDP (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_problem():
    torch.manual_seed(0)
    B, C, h, w = 4, 6, 3, 4
    return (F.normalize(torch.randn(B, C, h, w, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(B, C, h, w, dtype=torch.float64), dim=1),
            torch.randint(0, 3, (B, h, w)))


def _rank_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        f, fd, lab = _global_problem()
        b = f.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        for formulation in FORMS:
            x, xd = f[sl].clone().requires_grad_(True), fd[sl].clone().requires_grad_(True)
            fo, lo = partner_views(xd, lab[sl], shift=3)
            loss = cross_image_loss(x, xd, lab[sl], fo, lo, formulation=formulation, chunk_size=5)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.save({"loss": mean_loss / world, "gx": x.grad / world, "gxd": xd.grad / world},
                       os.path.join(out_dir, f"{formulation}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Gathered partners with gradients: 2 ranks x 2 images give the loss (mean over ranks) and the
    gradients (what DDP's average produces) of one process with the 4-image global batch."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    f, fd, lab = _global_problem()
    for formulation in FORMS:
        x, xd = f.clone().requires_grad_(True), fd.clone().requires_grad_(True)
        fo, lo = partner_views(xd, lab, shift=3)
        loss = cross_image_loss(x, xd, lab, fo, lo, formulation=formulation, chunk_size=5)
        loss.backward()
        parts = [torch.load(tmp_path / f"{formulation}_rank{r}.pt") for r in range(2)]
        assert parts[0]["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(torch.cat([p["gx"] for p in parts]), x.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(torch.cat([p["gxd"] for p in parts]), xd.grad, rtol=1e-10, atol=1e-12)
        assert xd.grad.abs().sum() > 0
