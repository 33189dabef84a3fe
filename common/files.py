"""Files and folders the project writes: folders checked once up front, files replaced atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


TEMPORARY_INFIX = ".tmp-"  # of atomic_write's temporary files: ".<name>.tmp-<pid>" beside the target


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through ``write(file)`` into a temporary file in the same folder, synced and renamed over
    `path`: a crash or a full disk leaves the previous file whole, and a failed write removes its temporary
    (the error propagates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMPORARY_INFIX}{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
