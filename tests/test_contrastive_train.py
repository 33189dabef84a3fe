"""Contrastive pre-training: distorted batches (aligned labels, shared labelled subset), the network
(decoder key layout, unit features), a few optimizer steps reduce the loss on a fixed batch, and (slow)
train.py end to end -> finetune.py --task segmentation from its backbone, and a 2-process DDP run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, *overrides):
    from cheaplunch.config import load_config
    from cheaplunch.registry import METHODS

    return load_config(METHODS["contrastive"].config_path, None, [
        f"data.root={root}", "data.base_size=32", "data.crop_size=32", "data.batch_size=4", "data.num_workers=0",
        "model.decoder_channels=32", "model.proj_dim=16", "model.chunk_size=16", *overrides])


def test_batches_are_aligned_and_use_the_finetuning_subset(tiny_embedded):
    from datamodules.distorted import DistortedDataModule
    from datamodules.finetune_common import labelled_subset
    from datamodules.segmentation import SegmentationDataModule

    cfg = _cfg(tiny_embedded, "data.label_fraction=0.5", "data.subset_seed=3")
    dm = DistortedDataModule(cfg)
    dm.setup("fit")
    assert dm.num_classes >= 2
    expected = labelled_subset(12, 0.5, None, 3)
    assert list(dm.train_set.base.indices) == list(expected)
    from cheaplunch.config import load_config
    from cheaplunch.registry import TASKS

    ft_cfg = load_config(TASKS["segmentation"].config_path, None, [
        f"data.root={tiny_embedded}", "data.label_fraction=0.5", "data.subset_seed=3", "data.num_workers=0"])
    seg = SegmentationDataModule(ft_cfg)  # fine-tuning with the same settings: the same images
    seg.setup("fit")
    assert list(seg.train_set.indices) == list(expected)

    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == batch.distorted.shape == (4, 3, 32, 32)
    assert batch.images.dtype == batch.distorted.dtype == torch.uint8
    assert batch.labels.shape == (4, 32, 32) and batch.labels.dtype == torch.long
    assert not torch.equal(batch.images, batch.distorted)

    # with the distortion switched off both views are the same crop: the geometry (and labels) are shared
    off = _cfg(tiny_embedded, "data.distortion.jitter_p=0", "data.distortion.grayscale_p=0",
               "data.distortion.blur_p=0")
    dm_off = DistortedDataModule(off)
    dm_off.setup("fit")
    torch.manual_seed(0)
    image, distorted, label, _ = dm_off.train_set[0]
    assert torch.equal(image, distorted)
    torch.manual_seed(0)
    image2, label2, _ = dm_off.train_set.base[0]  # the fine-tuning crop from the same random draws
    assert torch.equal(image, image2) and torch.equal(label, label2)


def test_distortion_is_photometric_and_seeded():
    from datamodules.distorted import Distortion

    d = Distortion(jitter_p=1.0, grayscale_p=0.0, blur_p=1.0)
    img = (torch.rand(3, 16, 16) * 255).byte()
    a = d(img, torch.Generator().manual_seed(1))
    b = d(img, torch.Generator().manual_seed(1))
    assert a.shape == img.shape and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, img)
    with pytest.raises(Exception, match="hue"):
        Distortion(hue=0.7)


def test_network_shapes_and_decoder_layout(tiny_embedded):
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead

    from lightning_modules.contrastive import ContrastiveModule

    module = ContrastiveModule(_cfg(tiny_embedded, "model.decoder_channels=256", "model.proj_dim=256"))
    z = module(torch.zeros(2, 3, 32, 48, dtype=torch.uint8))
    assert z.shape == (2, 256, 8, 12)  # loss stride 4
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 8, 12), atol=1e-5)
    head = DeepLabHead(module.backbone.num_features, 5).state_dict()
    mine = module.embed.decoder.state_dict()
    assert set(mine) == {k for k in head if not k.startswith("4.")}
    assert all(mine[k].shape == head[k].shape for k in mine)


@pytest.mark.parametrize("loss, formulation", [("cross", "paper"), ("within", "official"), ("batch", "paper")])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny_embedded, loss, formulation):
    from datamodules.distorted import DistortedDataModule
    from lightning_modules.contrastive import ContrastiveModule

    torch.manual_seed(0)
    cfg = _cfg(tiny_embedded, f"model.loss={loss}", f"model.formulation={formulation}", "optim.lr=0.05",
               "optim.name=adamw", "model.max_pixels=40", "model.sampling=balanced")
    batch = next(iter(DistortedDataModule(cfg).train_dataloader()))
    module = ContrastiveModule(cfg)
    opt = module.configure_optimizers()
    opt.param_groups[0]["lr"] = opt.param_groups[-1]["lr"] = 1e-3
    losses = []
    for _ in range(4):
        out = module.compute_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_config_errors(tiny_embedded):
    from common.errors import UserError
    from lightning_modules.contrastive import ContrastiveModule

    with pytest.raises(UserError, match="model.loss"):
        ContrastiveModule(_cfg(tiny_embedded, "model.loss=pixel"))
    with pytest.raises(UserError, match="model.formulation"):
        ContrastiveModule(_cfg(tiny_embedded, "model.formulation=tf"))


# ------------------------------------------------------------------------------------ end to end (slow)
def _cli(script, *args, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


_TINY = ["trainer.accelerator=cpu", "data.base_size=32", "data.crop_size=32", "data.batch_size=4",
         "data.num_workers=0", "model.decoder_channels=32", "model.proj_dim=16", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_train_py_then_finetune_py_segmentation(tmp_path, tiny_embedded):
    run = tmp_path / "pre"
    _cli("train.py", "--method", "contrastive", "--data", str(tiny_embedded), "--out", str(run), "--logger", "csv",
         *_TINY, "trainer.max_steps=2", "logging.images_every_n_steps=1", "data.label_count=6")
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "decoder.pt").is_file()
    assert len(list((run / "images" / "contrastive_views").glob("*.png"))) == 2 * 4
    assert json.loads((run / "backbone.json").read_text())["arch"] == "resnet18"
    state = torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)
    import timm

    timm.create_model("resnet18", num_classes=0, output_stride=16).load_state_dict(state, strict=True)
    assert "train/loss_cross" in (run / "csv" / "metrics.csv").read_text()

    out = tmp_path / "ft"
    proc = _cli("finetune.py", "--task", "segmentation", "--backbone", str(run), "--data", str(tiny_embedded),
                "--out", str(out), "--logger", "csv", "--label-count", "6", "trainer.accelerator=cpu",
                "trainer.max_steps=1", "trainer.val_check_interval=1", "data.base_size=32", "data.crop_size=32",
                "data.val_size=32", "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=0")
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["mIoU"] <= 1.0
    ft = torch.load(out / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert "model.classifier.4.weight" in ft  # DeepLabV3 classifier on the pre-trained backbone
    # the pre-trained ASPP (32 channels here) seeded the head, which took its width
    assert "DeepLab head: ASPP + 3x3 conv/BN from exported backbone" in proc.stdout + proc.stderr
    assert ft["model.classifier.1.weight"].shape == (32, 32, 3, 3)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_embedded):
    run = tmp_path / "ddp"
    _cli("train.py", "--method", "contrastive", "--data", str(tiny_embedded), "--out", str(run), "--logger", "csv",
         *_TINY, "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp", "logging.audit_ranks=true",
         "data.batch_size=2", env_extra={"MASTER_PORT": "29533"})
    audits = [json.loads(p.read_text()) for p in sorted((run / "audit").glob("rank*.json"))]
    assert len(audits) == 2 and {a["world_size"] for a in audits} == {2}
    assert audits[0]["weights_sha256"] == audits[1]["weights_sha256"]
