"""Shared pytest fixtures (keep this file small)."""

import pytest


@pytest.fixture(scope="session")
def tiny_embedded(tmp_path_factory):
    """A tiny embedded dataset built once per session: 12 train + 4 val images of 128x128 px in the
    project layout (images/, masks/, annotations/instances_{train,val}.json). Returns its root Path;
    treat it as read-only (copy it if a test must change files)."""
    from datamodules.embedded import build_embedded

    root = tmp_path_factory.mktemp("tiny_embedded")
    return build_embedded(root, size=12, seed=0, image_size=128, val_size=4, progress=False)
