"""FCMAE: masks, the dense-masked encoder's no-leak property, decoder/loss against a direct computation,
export into a plain timm model, and (slow) training runs through train.py."""

import json

import pytest
import timm
import torch

from models.fcmae import (
    FCMAE,
    MaskedEncoder,
    fcmae_loss,
    num_masked,
    patchify,
    random_mask,
    unpatchify,
    upsample_mask,
)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, including non-zero biases, LayerNorm affine and GRN gamma/beta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if p.ndim == 1 else 0.0))


def _pixel_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    return upsample_mask(mask, stride).bool().unsqueeze(1)


# ------------------------------------------------------------------------------------------ masks
def test_mask_ratio_exact_per_image():
    assert num_masked(49, 0.6) == 30  # the official 7x7 grid
    for h, w, ratio in [(7, 7, 0.6), (4, 4, 0.6), (2, 3, 0.75), (5, 5, 0.0)]:
        m = random_mask(16, h, w, ratio, generator=torch.Generator().manual_seed(0))
        assert m.shape == (16, h, w)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (m.flatten(1).sum(1) == num_masked(h * w, ratio)).all()
    a = random_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(1))
    b = random_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_patch_size_must_be_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match="multiple of the encoder's total stride"):
        FCMAE("convnextv2_atto", patch_size=48)
    model = FCMAE("convnextv2_atto", patch_size=64, decoder_dim=32)
    mask = model.random_mask(torch.zeros(3, 3, 128, 128), generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 4, 4)
    coarse = mask[:, ::2, ::2]
    assert torch.equal(upsample_mask(coarse, 2), mask)  # 2x2 blocks of the final grid
    assert (coarse.flatten(1).sum(1) == num_masked(4, 0.6)).all()
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model(torch.zeros(1, 3, 96, 96))


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 64, 96)
    p = patchify(x, 32)
    assert p.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(p[1, 4].reshape(32, 32, 3).permute(2, 0, 1), x[1, :, 32:64, 32:64])
    assert torch.equal(unpatchify(p, 32, 2, 3), x)


# ------------------------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("arch", ["convnextv2_atto", "convnextv2_tiny"])
def test_encoder_output_at_visible_positions_ignores_masked_pixels(arch):
    """The defining property: replace the pixels under the mask by noise -> visible outputs unchanged
    (bit for bit). Random weights with non-zero biases and GRN parameters; tiny uses Linear MLPs
    (channels-last GRN), atto 1x1 convs (channels-first GRN)."""
    kwargs = {"depths": (1, 1, 2, 1), "dims": (16, 24, 32, 40)} if arch == "convnextv2_tiny" else {}
    backbone = timm.create_model(arch, num_classes=0, global_pool="", **kwargs)
    _randomize(backbone)
    enc = MaskedEncoder(backbone).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 96, generator=g)
    mask = random_mask(2, 4, 3, 0.6, generator=g)
    pm = _pixel_mask(mask, 32).expand_as(images)
    noisy = torch.where(pm, torch.randn(images.shape, generator=g) * 10, images)
    with torch.no_grad():
        out, out_noisy = enc(images, mask), enc(noisy, mask)
    vis = (mask == 0).unsqueeze(1).expand_as(out)
    assert out.shape == (2, enc.num_features, 4, 3)
    assert out[vis].abs().sum() > 0
    assert torch.equal(out[vis], out_noisy[vis])
    assert (out[~vis] == 0).all()
    # the same test catches a leak: timm's own forward on zero-filled images does depend on the noise
    with torch.no_grad():
        plain, plain_noisy = backbone.forward_features(images), backbone.forward_features(noisy)
    assert not torch.allclose(plain[vis], plain_noisy[vis])


def test_encoder_without_masking_matches_timm():
    backbone = timm.create_model("convnextv2_atto", num_classes=0, global_pool="")
    _randomize(backbone, seed=2)
    enc = MaskedEncoder(backbone).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, torch.zeros(2, 2, 2)), backbone.forward_features(x), rtol=1e-4, atol=1e-4)


def test_encoder_rejects_non_convnextv2():
    with pytest.raises(ValueError, match="ConvNeXt V2"):
        MaskedEncoder(timm.create_model("convnext_atto", num_classes=0))


# ------------------------------------------------------------------------------------------ loss
def _direct_loss(pred, images, mask, p, norm):
    """Loop over images and patches: mean over masked patches of the per-patch MSE."""
    total, count = 0.0, 0
    n, _, h, w = pred.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if mask[i, y, x] == 0:
                    continue
                t = images[i, :, y * p:(y + 1) * p, x * p:(x + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm:
                    t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                total += ((pred[i, :, y, x].double() - t) ** 2).mean()
                count += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_loss_matches_direct_computation(norm):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 96, generator=g)
    pred = torch.randn(3, 32 * 32 * 3, 2, 3, generator=g)
    mask = random_mask(3, 2, 3, 0.6, generator=g)
    loss = fcmae_loss(pred, images, mask, norm_pix_loss=norm)
    torch.testing.assert_close(loss.double(), _direct_loss(pred, images, mask, 32, norm), rtol=1e-5, atol=1e-6)


def test_visible_patches_contribute_nothing():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    pred = torch.randn(2, 32 * 32 * 3, 2, 2, generator=g, requires_grad=True)
    mask = random_mask(2, 2, 2, 0.6, generator=g)
    loss = fcmae_loss(pred, images, mask)
    changed = pred.detach().clone()
    changed[(mask == 0).unsqueeze(1).expand_as(changed)] = 1e3
    assert torch.equal(fcmae_loss(changed, images, mask), loss.detach())
    loss.backward()
    assert (pred.grad.abs().sum(1)[mask == 0] == 0).all()
    assert (pred.grad.abs().sum(1)[mask == 1] > 0).all()


def test_fcmae_forward_shapes_and_decoder():
    model = FCMAE("convnextv2_atto", decoder_dim=64)
    images = torch.randn(2, 3, 64, 96)
    loss, pred, mask = model(images)
    assert pred.shape == (2, 32 * 32 * 3, 2, 3) and mask.shape == (2, 2, 3) and loss.ndim == 0
    assert (mask.flatten(1).sum(1) == num_masked(6, 0.6)).all()
    assert {"mask_token", "decoder.0.grn.gamma", "decoder.0.grn.beta"} <= model.no_weight_decay()
    # the decoder fills masked positions with the mask token: their features do not matter
    feats = model.forward_encoder(images, mask)
    other = feats + 5.0 * mask.unsqueeze(1)
    torch.testing.assert_close(model.forward_decoder(feats, mask), model.forward_decoder(other, mask))
    rec = model.reconstruct(images, pred, mask)
    vis = (upsample_mask(mask, 32) == 0).unsqueeze(1).expand_as(images)
    torch.testing.assert_close(rec[vis], images[vis])


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = FCMAE("convnextv2_atto", decoder_dim=64)
    # smooth images (upsampled 4x4 noise): masked patches are predictable, as in photos
    images = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4), size=(64, 64), mode="bilinear")
    mask = model.random_mask(images, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(5):
        loss, _, _ = model(images, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] * 0.98, losses


def test_exported_encoder_loads_strictly_into_plain_timm():
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    _randomize(model.encoder.model, seed=3)
    state = model.encoder.model.state_dict()
    plain = timm.create_model("convnextv2_atto", num_classes=0)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), model.encoder.model.forward_features(x))


# ------------------------------------------------------------------------------------------ data + module
def _cfg(root, *overrides):
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS

    return load_config(METHODS["fcmae"].config_path, None, [
        f"data.root={root}", "data.image_size=64", "data.batch_size=4", "data.num_workers=0",
        "model.decoder_dim=64", *overrides])


def test_datamodule_batches_masks_and_determinism(tiny_embedded):
    from datamodules.masked import MaskedDataModule

    def first_batches(seed, epoch=0):
        dm = MaskedDataModule(_cfg(tiny_embedded, f"seed={seed}"))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    a, b = first_batches(0), first_batches(0)
    assert a.images.shape == (4, 3, 64, 64) and a.images.dtype == torch.float32
    assert a.mask.shape == (4, 2, 2)
    assert (a.mask.flatten(1).sum(1) == num_masked(4, 0.6)).all()
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask) and torch.equal(a.keys, b.keys)
    c, d = first_batches(1), first_batches(0, epoch=1)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, d.images) and (d.keys >= 12).all()  # epoch 1: fresh draws


def test_datamodule_rejects_bad_geometry_and_too_few_images(tiny_embedded):
    from common.errors import UserError
    from datamodules.masked import MaskedDataModule

    with pytest.raises(UserError, match="multiple of the encoder's total stride 32"):
        MaskedDataModule(_cfg(tiny_embedded, "model.patch_size=16"))
    with pytest.raises(UserError, match="multiple of patch_size"):
        MaskedDataModule(_cfg(tiny_embedded, "data.image_size=80"))
    # 12 images and batch 16: an empty epoch (drop_last) would train nothing without a word
    with pytest.raises(UserError, match=r"12 training images give 12 per process .*data.batch_size=16"):
        MaskedDataModule(_cfg(tiny_embedded, "data.batch_size=16")).train_dataloader()


def test_weight_decay_groups_and_peak_lr(tiny_embedded):
    from lightning_modules.fcmae import FCMAEModule

    module = FCMAEModule(_cfg(tiny_embedded, "data.batch_size=64", "optim.lr=1.5e-4"))
    opt = module.configure_optimizers()
    names = {id(p): n for n, p in module.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in opt.param_groups)
    assert opt.defaults["betas"] == (0.9, 0.95) and type(opt).__name__ == "AdamW"
    assert module.peak_lr == pytest.approx(1.5e-4 * 64 / 256)
    assert {"fcmae.mask_token", "fcmae.decoder.0.grn.gamma", "fcmae.decoder.0.grn.beta",
            "backbone.stages.0.blocks.0.mlp.grn.weight", "backbone.stages.0.blocks.0.mlp.grn.bias",
            "backbone.stem.0.bias", "backbone.stem.1.weight"} <= no_decay
    assert all(module.get_parameter(n).ndim > 1 for n in decay) and all("grn" not in n for n in decay)
    assert "backbone.stem.0.weight" in decay and "fcmae.pred.weight" in decay
    # the encoder is the backbone, held once: no fcmae.encoder.* copy in the state_dict
    assert module.fcmae.encoder.model is module.backbone
    assert not [k for k in module.state_dict() if k.startswith("fcmae.encoder")]
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == sum(p.numel() for p in module.backbone.parameters()) + sum(
        p.numel() for n, p in module.fcmae.named_parameters())


def test_module_steps_reduce_the_loss_on_a_fixed_real_batch(tiny_embedded):
    from datamodules.masked import MaskedDataModule
    from lightning_modules.fcmae import FCMAEModule

    torch.manual_seed(0)
    cfg = _cfg(tiny_embedded, "optim.lr=2e-2")  # lr 2e-2 x 4/256 = 3e-4
    batch = next(iter(MaskedDataModule(cfg).train_dataloader()))
    module = FCMAEModule(cfg)
    opt = module.configure_optimizers()
    losses = []
    for _ in range(4):
        out = module.compute_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss_recon"]))
    assert out["mask_ratio"] == pytest.approx(0.75)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------ end to end (slow)
def _train(tmp_path, data, *args, env_extra=None, timeout=300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           **(env_extra or {})}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "train.py", "--method", "fcmae", "--data", str(data), "--out", str(tmp_path / "run"),
           "trainer.accelerator=cpu", "data.image_size=64", "data.batch_size=4", "data.num_workers=0",
           "model.decoder_dim=64", "trainer.log_every_n_steps=1", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
def test_train_py_end_to_end_exports_a_plain_timm_encoder(tmp_path, tiny_embedded):
    run = _train(tmp_path, tiny_embedded, "trainer.max_steps=3", "logging.images_every_n_steps=2")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    pictures = sorted((run / "images" / "fcmae_reconstruction").glob("*.png"))
    assert len(pictures) == 2 * 4  # steps 0 and 2, 4 images each
    assert list((run / "wandb").glob("offline-run-*/files/media/images/fcmae/reconstruction*.png"))
    state = torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)
    plain = timm.create_model("convnextv2_atto", num_classes=0)
    plain.load_state_dict(state, strict=True)  # the head (classifier) is left out, nothing else
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    assert all(torch.equal(state[k], trained[k]) for k in state)
    fresh = timm.create_model("convnextv2_atto", num_classes=0).state_dict()
    assert not torch.equal(state["stem.0.weight"], fresh["stem.0.weight"])  # trained, not a fresh init
    # the fine-tuning loader (finetune.py --backbone) takes the run folder and the Lightning checkpoint
    from models.backbone_loading import load_backbone_weights, resolve_backbone
    from models.backbones import create_backbone

    for spec in (run, run / "checkpoints" / "last.ckpt"):
        source = resolve_backbone(str(spec))
        assert source.arch == "convnextv2_atto" and set(source.state) == set(state)
        load_backbone_weights(create_backbone(source.arch), source.state, str(spec))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_embedded):
    run = _train(tmp_path, tiny_embedded, "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
                 "logging.audit_ranks=true", "--logger", "csv", env_extra={"MASTER_PORT": "29517"})
    state = torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)
    timm.create_model("convnextv2_atto", num_classes=0).load_state_dict(state, strict=True)
    audits = [json.loads(p.read_text()) for p in sorted((run / "audit").glob("rank*.json"))]
    assert len(audits) == 2 and {a["world_size"] for a in audits} == {2}
    assert audits[0]["weights_sha256"] == audits[1]["weights_sha256"]  # DDP kept the replicas identical
    # 12 images / 2 ranks / batch 4: one step per epoch; within an epoch the ranks see disjoint images
    assert len(audits[0]["indices"]) == 2 * 4 and not set(audits[0]["indices"][:4]) & set(audits[1]["indices"][:4])


def test_preview_pictures(tmp_path, tiny_embedded):
    from PIL import Image

    from datamodules.masked import MaskedDataModule

    paths = MaskedDataModule(_cfg(tiny_embedded)).write_preview(tmp_path, 2)
    assert len(paths) == 2
    with Image.open(paths[0]) as im:
        assert im.size == (128, 64)  # crop | masked crop


def test_paper_config_resolves_to_the_paper_recipe():
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS
    from common.paths import CONFIG_DIR
    from lightning_modules.base import global_batch_size, peak_lr

    cfg = load_config(METHODS["fcmae"].config_path, CONFIG_DIR / "fcmae_paper.yaml")
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    assert global_batch_size(cfg, world) == 4096
    assert peak_lr(cfg, world) == pytest.approx(1.5e-4 * 4096 / 256)
    assert (cfg.model.mask_ratio, cfg.model.patch_size, cfg.model.decoder_dim, cfg.model.norm_pix_loss) == (0.6, 32, 512, True)
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.name == "adamw"
    assert cfg.schedule.warmup_epochs == 40 and tuple(cfg.data.crop_scale) == (0.2, 1.0) and not cfg.ema.enabled


def test_channels_last_and_bf16_autocast_paths(tiny_embedded):
    """The paper YAML runs channels_last + bf16-mixed: same loss in channels_last, and under bf16 autocast
    the loss is finite and the no-leak property still holds."""
    from datamodules.masked import MaskedDataModule
    from lightning_modules.fcmae import FCMAEModule

    cfg = _cfg(tiny_embedded)
    batch = next(iter(MaskedDataModule(cfg).train_dataloader()))
    torch.manual_seed(0)
    plain = FCMAEModule(cfg)
    cfg.runtime.channels_last = True
    cl = FCMAEModule(cfg)
    cl.load_state_dict(plain.state_dict())
    cl.configure_model()
    torch.testing.assert_close(cl.compute_losses(batch)["loss"], plain.compute_losses(batch)["loss"], rtol=1e-4, atol=1e-5)

    model = plain.fcmae
    mask = model.to_final_grid(batch.mask, batch.images.shape[-2:])
    noisy = torch.where(_pixel_mask(mask, 32).expand_as(batch.images), torch.randn_like(batch.images), batch.images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(batch.images, batch.mask)
        a, b = model.forward_encoder(batch.images, mask), model.forward_encoder(noisy, mask)
    assert torch.isfinite(loss) and a.dtype == torch.bfloat16
    assert torch.equal(a, b)


def test_crop_box_follows_random_resized_crop_and_the_draw_key():
    import numpy as np

    from datamodules.masked import random_resized_crop_box

    def draw(key: int, h: int = 120, w: int = 200, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        return random_resized_crop_box(h, w, np.random.default_rng([0, key]), scale, ratio)

    boxes = [draw(k) for k in range(500)]
    assert draw(7) == boxes[7]  # a crop depends only on its draw key, whatever ran before
    for x, y, cw, ch in boxes:
        assert x >= 0 and y >= 0 and x + cw <= 200 and y + ch <= 120  # inside the image
        # area within scale and aspect within ratio, up to the rounding of the sides to whole pixels
        assert 0.2 * 24000 * 0.97 <= cw * ch <= 24000
        assert 3 / 4 * 0.97 <= cw / ch <= 4 / 3 * 1.03
    areas = np.array([cw * ch / 24000 for _, _, cw, ch in boxes])
    assert 0.35 < areas.mean() < 0.65 and len(set(boxes)) > 450  # spread over the range, not one box
    # no crop of the asked shape fits: torchvision's fallback, the centre crop clamped to the ratio (hand count:
    # a 100 x 100 image at aspect 2 -> 100 wide, 50 high, centred)
    assert draw(0, 100, 100, (1.0, 1.0), (2.0, 2.0)) == (0, 25, 100, 50)
