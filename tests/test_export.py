"""Exported backbone: round trip into a plain timm model, weights_only loading, clear mismatch errors."""

import json

import numpy as np
import pytest
import timm
import torch

from common.errors import UserError
from models.backbones import create_backbone
from models.export import export_backbone, load_state_strict, read_backbone


def test_round_trip_into_plain_timm(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("resnet18")
    export_backbone(backbone, "resnet18", tmp_path, method="test")
    info = json.loads((tmp_path / "backbone.json").read_text())
    assert info["arch"] == "resnet18" and info["method"] == "test"
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)  # plain tensors only
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    plain.load_state_dict(state, strict=True)  # timm key layout, nothing missing
    x = torch.randn(2, 3, 64, 64)
    backbone.eval()
    plain.eval()
    torch.testing.assert_close(plain.forward_features(x), backbone(x))
    state2, info2 = read_backbone(tmp_path)
    assert info2 == info and state2.keys() == state.keys()


def test_mismatch_lists_missing_keys(tmp_path):
    export_backbone(create_backbone("resnet18"), "resnet18", tmp_path)
    state, _ = read_backbone(tmp_path / "backbone.pt")
    with pytest.raises(UserError, match=r"missing \(\d+\): .*layer1\.2"):
        load_state_strict(create_backbone("resnet34"), state, "backbone.pt")
    del state["conv1.weight"]
    with pytest.raises(UserError, match="missing.*conv1.weight"):
        load_state_strict(create_backbone("resnet18"), state, "backbone.pt")


def test_read_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_backbone(tmp_path / "nope.pt")
    (tmp_path / "backbone.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="backbone.json"):
        read_backbone(tmp_path)
    (tmp_path / "backbone.json").write_text('{"arch": "resnet18"}')
    with pytest.raises(UserError, match="backbone.pt: exported backbone unreadable: not a torch weights file") as err:
        read_backbone(tmp_path)
    assert len(str(err.value).splitlines()) == 1 and "likely succeed" not in str(err.value)


def test_read_errors_name_the_file_at_fault(tmp_path):
    """Issue #14: a broken backbone.json beside a good backbone.pt is the JSON's problem; a garbage or
    pickled-object .pt is refused / unreadable in one line, without torch's advice to drop weights_only."""
    from models.export import load_weights

    export_backbone(create_backbone("resnet18"), "resnet18", tmp_path)
    (tmp_path / "backbone.json").write_text('{"arch": "resnet18",')
    with pytest.raises(UserError, match=r"backbone\.json: cannot read the exported backbone's description"):
        read_backbone(tmp_path)
    (tmp_path / "backbone.json").write_text('["resnet18"]')
    with pytest.raises(UserError, match=r"backbone\.json: not an exported backbone's description"):
        read_backbone(tmp_path)
    torch.save({"w": torch.zeros(1), "extra": torch.nn.Linear(1, 1)}, tmp_path / "object.pt")
    cases = {"object.pt": "refused for safety: it holds a pickled Python object (torch.nn.modules.linear.Linear)",
             "empty.pt": "unreadable: the file is empty", "text.pt": "unreadable: not a torch weights file",
             "cut.pt": "unreadable (truncated or corrupt zip archive)"}
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"garbage text")
    for seed in (0, 17, 21):  # random bytes fail inside torch.load as UnpicklingError or IndexError
        (tmp_path / f"random{seed}.pt").write_bytes(np.random.default_rng(seed).bytes(4096))
        cases[f"random{seed}.pt"] = "unreadable: not a torch weights file"
    (tmp_path / "cut.pt").write_bytes((tmp_path / "backbone.pt").read_bytes()[:5000])
    for name, fragment in cases.items():
        with pytest.raises(UserError) as err:
            load_weights(tmp_path / name, "weights")
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: weights {fragment}"), message
        assert len(message.splitlines()) == 1 and "likely succeed" not in message


def test_pretrained_fails_clearly_offline():
    with pytest.raises(UserError, match="no internet"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(UserError, match="unknown timm architecture"):
        create_backbone("resnet_nonexistent")
