"""Montage pre-training end to end: each objective learns, the CLI run folder, ERF refresh and resume,
preview files, and a 2-process DDP run."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from callbacks.erf_refresh import ERFRefresh
from cheaplunch.config import load_config
from common.paths import CONFIG_DIR, REPO_ROOT
from tests.wandb_offline import find_run_file, read_offline_run

TINY = ["model.arch=resnet18", "data.canvas=96", "data.batch_size=4", "data.num_workers=0", "data.max_side=96",
        "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "logging.images_every_n_steps=2",
        "checkpoint.every_n_steps=2"]


def _train(data, out, *extra, timeout=600, logger="none"):
    cmd = [sys.executable, "train.py", "--method", "montage", "--data", str(data), "--out", str(out),
           "--logger", logger, *TINY, *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _datamodule(data):
    from datamodules.montage import MontageDataModule

    cfg = load_config(CONFIG_DIR / "montage.yaml", None, [f"data.root={data}", *TINY])
    dm = MontageDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return cfg, dm


def test_refresh_is_due_at_start_and_every_n_steps():
    cb = ERFRefresh(every_n_steps=5)
    assert cb.due(0, -1) and cb.due(7, -1)  # never computed: now
    assert not cb.due(0, 0) and not cb.due(4, 0)
    assert cb.due(5, 0) and cb.due(10, 5) and not cb.due(10, 10)


@pytest.mark.parametrize("objective", ["global", "blockwise", "erf_dense"])
def test_each_objective_reduces_the_loss_on_a_fixed_batch(tiny_embedded, objective):
    from lightning_modules.montage import MontageModule
    from models.erf import compute_erf, soft_label_weights

    cfg, dm = _datamodule(tiny_embedded)
    cfg.model.objective = objective
    cfg.model.num_classes = dm.num_classes
    torch.manual_seed(0)
    module = MontageModule(cfg)
    module.configure_model()
    # the loader emits uint8; Lightning normalises on the device with this hook before training_step
    batch = module.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    if objective == "erf_dense":
        erf = compute_erf(module.backbone, batch.images[:2])
        module.erf_weights.copy_(soft_label_weights(erf, module.layout.region_masks(), tau=0.7))
        assert not torch.allclose(module.erf_weights, torch.nn.functional.one_hot(module.position_regions, 4).float())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    module.train()
    losses = []
    for _ in range(12):
        loss = module.compute_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_num_classes_that_disagrees_with_the_data_is_an_error(tiny_embedded):
    import types

    from common.errors import UserError
    from lightning_modules.montage import MontageModule

    cfg, dm = _datamodule(tiny_embedded)
    cfg.model.num_classes = dm.num_classes + 1
    module = MontageModule(cfg)
    module._trainer = types.SimpleNamespace(datamodule=dm)  # what build_heads reads
    with pytest.raises(UserError, match=f"model.num_classes={dm.num_classes + 1}"):
        module.build_heads()


@pytest.mark.parametrize("channels_last", [False, True])
def test_objective_batches_are_uint8_and_normalised_after_transfer(tiny_embedded, channels_last):
    """The DataLoader's batch is uint8; ``on_after_batch_transfer`` makes it (x / 255 - mean) / std float32
    in the configured memory format (the labels etc. untouched), the montage pictures logged from the
    normalised batch (``denormalize``) are the raw canvases, and ``compute_losses`` refuses uint8."""
    from common.images import IMAGENET_MEAN, IMAGENET_STD, denormalize
    from datamodules.montage import MontageBatch
    from lightning_modules.montage import MontageModule

    cfg, dm = _datamodule(tiny_embedded)
    cfg.model.num_classes = dm.num_classes
    cfg.runtime.channels_last = channels_last
    module = MontageModule(cfg)
    module.configure_model()
    raw = next(iter(dm.train_dataloader()))
    assert isinstance(raw, MontageBatch) and raw.images.dtype == torch.uint8
    batch = module.on_after_batch_transfer(raw, 0)
    assert isinstance(batch, MontageBatch) and batch.images.dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert batch.images.is_contiguous(memory_format=fmt)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.images.double(), (raw.images.double() / 255 - mean) / std, atol=1e-6, rtol=0)
    for name in ("labels", "cell_boxes", "index"):
        assert torch.equal(getattr(batch, name), getattr(raw, name))
    assert module.on_after_batch_transfer(batch, 0) is batch  # already normalised: passed through
    assert (denormalize(batch.images) == raw.images.permute(0, 2, 3, 1).numpy()).all()
    assert torch.isfinite(module.compute_losses(batch)["loss"])
    with pytest.raises(TypeError, match="on_after_batch_transfer"):
        module.compute_losses(raw)


@pytest.mark.slow
def test_train_py_run_folder_erf_refresh_and_resume(tiny_embedded, tmp_path):
    run = tmp_path / "run"
    _train(tiny_embedded, run, "trainer.max_steps=4", "model.erf.refresh_every=3", logger="wandb")
    wandb_run = read_offline_run(find_run_file(run))  # W&B offline: config, losses per term, lr, images
    assert wandb_run["config"]["sample_bank"]["total"] > 0 and wandb_run["config"]["model"]["objective"] == "erf_dense"
    logged = {key.split("/_")[0] for step in wandb_run["history"] for key in step}  # images: "erf/_type", ...
    assert {"train/loss", "train/loss_erf_dense", "lr", "train/region_acc"} <= logged, logged
    assert any(k.startswith("montages") for k in logged) and any(k.startswith("erf/") for k in logged), logged
    for name in ("config.yaml", "checkpoints/last.ckpt", "backbone.pt", "backbone.json"):
        assert (run / name).is_file(), name
    assert list((run / "images" / "montages").glob("*.png")) and list((run / "images" / "erf").glob("*.png"))
    info = json.loads((run / "backbone.json").read_text())
    plain = timm.create_model(info["arch"], num_classes=0)
    plain.load_state_dict(torch.load(run / "backbone.pt", weights_only=True), strict=True)

    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 4
    assert int(first["state_dict"]["erf_step"]) == 3  # refreshed at 0 and at 3
    # resume to 5 steps with a long refresh interval: no refresh, the stored weights carry over
    _train(tiny_embedded, run, "trainer.max_steps=5", "model.erf.refresh_every=3")
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 5
    assert int(second["state_dict"]["erf_step"]) == 3
    torch.testing.assert_close(second["state_dict"]["erf_weights"], first["state_dict"]["erf_weights"])
    assert not torch.equal(second["state_dict"]["classifier.conv.weight"], first["state_dict"]["classifier.conv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_installed_erf_weights_match_an_independent_recomputation(tiny_embedded, tmp_path, bn_mode):
    """The soft-label weights ERFRefresh installs in a real run, checked for value. Refreshes at steps 0
    and 2; ``step0000002.ckpt`` is written after step 2's optimizer step, just before the refresh at step
    2, so it holds the model that refresh saw, and ``last.ckpt`` (step 3) the weights it installed
    (``erf_weights``, ``erf_step`` = 2). Recomputed here from that checkpoint and the same ERF montages
    with the in-test reference ERF (tests/erf_reference.py; BatchNorm statistics of the montages for
    bn_mode "train") and the paper's formula written in the test."""
    from datamodules.montage import MontageDataModule
    from models.montage_canvas import MontageLayout
    from tests.erf_reference import literal_soft_label_weights, reference_erf, with_batch_statistics

    run = tmp_path / "run"
    _train(tiny_embedded, run, "trainer.max_steps=3", "model.erf.refresh_every=2", f"model.erf.bn_mode={bn_mode}")
    snapshot = torch.load(run / "checkpoints" / "step0000002.ckpt", weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert snapshot["global_step"] == 2 and int(snapshot["state_dict"]["erf_step"]) == 0
    assert last["global_step"] == 3 and int(last["state_dict"]["erf_step"]) == 2
    installed = last["state_dict"]["erf_weights"].double()

    cfg = load_config(CONFIG_DIR / "montage.yaml", run / "config.yaml")
    assert cfg.model.erf.bn_mode == bn_mode
    backbone = timm.create_model(cfg.model.arch, pretrained=False, num_classes=0, global_pool="")
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in snapshot["state_dict"].items() if k.startswith(prefix)})
    datamodule = MontageDataModule(cfg)
    images = datamodule.erf_images(int(cfg.model.erf.num_montages))
    layout = MontageLayout((int(cfg.data.canvas),) * 2, split=tuple(cfg.data.split))

    def recomputed(mode: str) -> torch.Tensor:
        net = with_batch_statistics(backbone, images) if mode == "train" else backbone
        erf = reference_erf(net, images)
        own = layout.position_regions(tuple(erf.shape[:2]))
        return literal_soft_label_weights(erf, layout.region_masks(), own, float(cfg.model.tau))

    expected = recomputed(bn_mode)
    assert installed.shape == expected.shape == (3, 3, 4)
    max_abs_diff = float((installed - expected).abs().max())
    other_mode_diff = float((installed - recomputed("eval" if bn_mode == "train" else "train")).abs().max())
    print(f"bn_mode={bn_mode}: installed vs recomputed ERF weights, max abs difference {max_abs_diff:.3g} "
          f"(vs the other bn_mode's recomputation: {other_mode_diff:.3g})")
    assert max_abs_diff < 1e-6
    assert other_mode_diff > 20 * max(max_abs_diff, 1e-6)  # the check can tell the two modes apart
    assert float(installed.max(dim=-1).values.min()) < 0.99  # soft somewhere, not the block-wise one-hot


@pytest.mark.slow
def test_preview_writes_png_and_json(tiny_embedded, tmp_path):
    _train(tiny_embedded, tmp_path / "run", "--preview", "2")
    preview = tmp_path / "run" / "preview"
    meta = json.loads((preview / "montage_0001.json").read_text())
    assert meta["canvas"] == [96, 96]
    assert [c["position"] for c in meta["cells"]] == ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert (preview / "montage_0000.png").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()  # preview does not train


@pytest.mark.slow
def test_ddp_two_processes_see_different_data_and_end_identical(tiny_embedded, tmp_path):
    run = tmp_path / "ddp"
    _train(tiny_embedded, run, "trainer.max_steps=3", "trainer.devices=2", "trainer.strategy=ddp",
           "logging.audit_ranks=true", "model.erf.refresh_every=2", timeout=900)
    ranks = [json.loads((run / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["indices"] and ranks[1]["indices"]
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])  # sharded: different montages
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # synchronised weights
    # every other buffer too (the ERF soft-label weights are broadcast from rank 0); only the
    # BatchNorm running statistics are per process
    assert ranks[0]["synced_state_sha256"] == ranks[1]["synced_state_sha256"]
