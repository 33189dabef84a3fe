"""Folders the project writes to (run folders, the cache), checked once up front."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError


def writable_folder(path: Path, what: str, way_out: str) -> Path:
    """Create `path` and check that it takes a file, or ONE line naming it: ``<path>: cannot write <what>
    (<reason>); <way_out>``. Called before any data is read, so a read-only or impossible folder costs
    nothing."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{path}: cannot write {what} ({exc.strerror or exc}); {way_out}") from exc
    return path
