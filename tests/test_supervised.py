"""`train.py --method supervised`: data sources, training steps, distillation from a teacher checkpoint,
and (slow) the CLI end to end with the exported backbone loaded by `finetune.py --task classification`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cheaplunch.config import load_config
from cheaplunch.registry import METHODS
from common.errors import UserError
from datamodules.classification_pretrain import FASHION_MNIST_DIR, SupervisedBatch, SupervisedDataModule
from lightning_modules.supervised import SupervisedModule
from models.distillation import distillation_loss, load_teacher

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.arch=resnet26", "model.backbone_kwargs={layers: [1, 1, 1, 1]}", "data.batch_size=8",
        "data.image_size=32", "data.decode_size=40", "data.num_workers=0", "data.val_batch_size=16"]


def cfg_of(*overrides: str):
    return load_config(METHODS["supervised"].config_path, None, [*TINY, *overrides])


def test_registry_entry():
    entry = METHODS["supervised"]
    assert entry.module_class() is SupervisedModule and entry.datamodule_class() is SupervisedDataModule
    assert entry.config_path.is_file()


def _check_batches(dm: SupervisedDataModule, size: int) -> None:
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SupervisedBatch)
    assert batch.images.shape == (8, 3, size, size) and batch.images.dtype == torch.float32
    assert -3 < batch.images.mean() < 3 and batch.labels.max() < dm.num_classes
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape[1:] == (3, size, size)


def test_datamodule_embedded_crops(tiny_embedded):
    dm = SupervisedDataModule(cfg_of(f"data.root={tiny_embedded}"))
    assert dm.source == "crops" and dm.num_classes >= 2
    _check_batches(dm, 32)


def test_datamodule_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = SupervisedDataModule(cfg_of(f"data.root={tmp_path}"))
    assert dm.source == "folder" and dm.class_names == ["cat", "dog"]
    _check_batches(dm, 32)
    assert dm.val_images.shape == (10, 3, 32, 32)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_datamodule_fashion_mnist_from_the_debian_package():
    dm = SupervisedDataModule(cfg_of("data.root=fashion-mnist", "data.label_count=64", "data.val_count=32"))
    assert dm.source == "fashion_mnist" and dm.num_classes == 10
    assert len(dm.split("train").labels) == 60000 and len(dm.split("val").labels) == 10000
    _check_batches(dm, 32)
    assert len(dm.train_rows) == 64 and len(dm.val_labels) == 32
    counts = np.bincount(dm.split("val").labels.numpy(), minlength=10)
    assert (counts == 1000).all()  # Fashion-MNIST's test split: 1000 images per class


def _fixed_batch(n: int = 8, classes: int = 4) -> SupervisedBatch:
    g = torch.Generator().manual_seed(0)
    return SupervisedBatch(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % classes, torch.arange(n))


@pytest.mark.parametrize("mixup", [0.0, 0.2])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(mixup):
    torch.manual_seed(0)
    np.random.seed(0)
    m = SupervisedModule(cfg_of("model.num_classes=4", f"model.mixup_alpha={mixup}"))
    m.configure_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.02)
    batch = _fixed_batch()
    m.train()
    losses = []
    for _ in range(5):
        np.random.seed(0)  # the same mixing coefficient every step: the loss is comparable
        out = m.compute_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0], losses


def _save_teacher(tmp_path: Path) -> tuple[Path, SupervisedModule]:
    teacher = SupervisedModule(cfg_of("model.num_classes=4", "model.init=timm", "model.zero_gamma=false"))
    teacher.configure_model()
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    return path, teacher.eval()


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    path, teacher = _save_teacher(tmp_path)
    loaded = load_teacher(path)
    batch = _fixed_batch()
    with torch.no_grad():
        assert torch.allclose(loaded(batch.images), teacher(batch.images), atol=1e-5)
    student = SupervisedModule(cfg_of("model.num_classes=4", "model.mixup_alpha=0", "model.label_smoothing=0",
                                      f"model.distill.teacher={path}", "model.distill.temperature=4",
                                      "model.distill.hard_weight=0.3"))
    student.configure_model()
    assert student.teacher is not None and not any(k.startswith("_teacher") for k in student.state_dict())
    student.eval()
    out = student.compute_losses(batch)
    with torch.no_grad():
        expect = distillation_loss(student(batch.images), teacher(batch.images), batch.labels, 4.0, 0.3)
    assert torch.allclose(out["loss"], expect[0], atol=1e-5)
    assert torch.allclose(out["kd"], expect[2], atol=1e-5) and torch.allclose(out["ce"], expect[1], atol=1e-5)
    wrong = SupervisedModule(cfg_of("model.num_classes=5", f"model.distill.teacher={path}"))
    with pytest.raises(Exception, match="4 classes"):
        wrong.configure_model()


# ------------------------------------------------------------------------------------------ end to end (slow)
def _run(script: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_py_end_to_end_bf16_then_finetune_classification(tmp_path, tiny_embedded):
    run = tmp_path / "sup"
    small = [o for o in TINY if not o.startswith("model.")] + ["model.arch=resnet18d"]
    _run("train.py", "--method", "supervised", "--data", str(tiny_embedded), "--out", str(run), "--logger", "csv",
         *small, "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
         "trainer.log_every_n_steps=1", "schedule.warmup_steps=1", "trainer.limit_val_batches=1")
    state = torch.load(run / "backbone.pt", map_location="cpu", weights_only=True)
    plain = timm.create_model("resnet18d", num_classes=0)
    plain.load_state_dict(state, strict=True)  # timm key layout, no classifier
    info = json.loads((run / "backbone.json").read_text())
    assert info["arch"] == "resnet18d" and info["method"] == "SupervisedModule"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["head.weight"].shape[0] == len(json.loads((tiny_embedded / "annotations" /
                                                                       "instances_train.json").read_text())["categories"])
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "lr" in metrics
    ft = tmp_path / "ft"
    _run("finetune.py", "--task", "classification", "--data", str(tiny_embedded), "--backbone", str(run / "backbone.pt"),
         "--out", str(ft), "--logger", "none", "trainer.max_steps=1", "trainer.val_check_interval=1",
         "data.image_size=32", "data.batch_size=8", "data.val_batch_size=16")
    assert set(json.loads((ft / "results.json").read_text())) == {"top1", "top5"}


class _Payload:
    """A pickled Python object: loading it with weights_only=False would run arbitrary code."""


def test_teacher_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "payload": _Payload()}, path)
    with pytest.raises(UserError, match="refused for safety"):
        load_teacher(path)
