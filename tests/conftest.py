"""Shared pytest fixtures (keep this file small)."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Derived data (sample banks, image checks) goes to a per-session folder, not the user's ~/.cache;
    subprocesses inherit it through the environment."""
    from datamodules.layout import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ[CACHE_ENV])
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tiny_embedded(tmp_path_factory):
    """A tiny embedded dataset built once per session: 12 train + 4 val images of 128x128 px in the
    project layout (images/, masks/, annotations/instances_{train,val}.json). Returns its root Path;
    treat it as read-only (copy it if a test must change files)."""
    from tools.embedded import build_embedded

    root = tmp_path_factory.mktemp("tiny_embedded")
    return build_embedded(root, size=12, seed=0, image_size=128, val_size=4, progress=False)


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (small models: less thread overhead on the 2-core CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
