"""datamodules.image_check: every image decoded once before training, verdicts cached by name, size and
mtime, and ``data.bad_images`` applied (issue #14 case 6)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError, DataWarning
from datamodules import image_check


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{k}.jpg")
    full = (images / "3.jpg").read_bytes()
    (images / "3.jpg").write_bytes(full[: len(full) // 3])  # cut short
    (images / "4.jpg").write_text("not an image")
    return images


def test_unreadable_files_are_found_and_the_second_pass_decodes_nothing(folder, tmp_path, monkeypatch):
    paths = sorted(folder.iterdir()) + [folder / "missing.jpg"]
    bad = image_check.unreadable_images(paths, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in bad) == ["3.jpg", "4.jpg", "missing.jpg"]
    assert bad[folder / "missing.jpg"] == "file not found"

    decoded = []
    real = image_check._decode_error
    monkeypatch.setattr(image_check, "_decode_error", lambda p: decoded.append(p.name) or real(p))
    assert image_check.unreadable_images(paths, cache_dir=tmp_path / "cache") == bad
    assert decoded == []  # every verdict came from the cache
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "3.jpg")  # repaired: new size and mtime
    assert sorted(p.name for p in image_check.unreadable_images(paths, cache_dir=tmp_path / "cache")) == [
        "4.jpg", "missing.jpg"]
    assert decoded == ["3.jpg"]


def test_policy_error_names_the_first_file_and_the_count(folder, tmp_path):
    paths = sorted(folder.iterdir())
    with pytest.raises(DataError, match=rf"^{folder / '3.jpg'}: cannot read image .*; 2 of 5 images of the train split "
                                        r"are unreadable; .*data.bad_images=skip"):
        image_check.check_images(paths, policy="error", what="the train split", cache_dir=tmp_path / "cache")


def test_policy_skip_warns_once_and_returns_the_bad_files(folder, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = image_check.check_images(sorted(folder.iterdir()), policy="skip", what="val", cache_dir=tmp_path / "c")
    assert bad == {folder / "3.jpg", folder / "4.jpg"}
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1 and "2 of 5 images of val" in messages[0] and "skipping them" in messages[0]
