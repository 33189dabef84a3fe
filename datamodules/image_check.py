"""Decode every image of a run once before training, so that a corrupt file is one line at start-up instead
of a DataLoader worker's traceback steps into training (issue #14 case 6).

Results are cached per folder under the cache root (``datamodules.layout.cache_root``) by file name, size
and modification time: a second run over the same files stats them and decodes nothing. What happens to
an unreadable file is ``data.bad_images``: ``error`` (default) stops with one line naming the first bad
file and the count; ``skip`` leaves those images out with one counted warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import DataError, DataWarning, UserError
from common.files import atomic_write

BAD_IMAGE_POLICIES = ("error", "skip")
CACHE_VERSION = 1
_warned: set[tuple[str, frozenset]] = set()  # skip warnings given in this process (prepare_data, then setup)


def _decode_error(path: Path) -> str | None:
    """None when `path` decodes with the project's image reader, else the reason it does not."""
    from datamodules.readers import read_image

    try:
        read_image(path)
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _cache_file(cache: Path, folder: Path) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache / "image_checks" / f"{key}.json"


def _load(file: Path, folder: Path) -> dict[str, list]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != CACHE_VERSION or data.get("folder") != str(folder.resolve()):
        return {}
    return data.get("files", {})


def _save(file: Path, folder: Path, files: dict[str, list]) -> None:
    text = json.dumps({"version": CACHE_VERSION, "folder": str(folder.resolve()), "files": files})
    atomic_write(file, lambda f: f.write(text.encode()))


def unreadable_images(paths: Iterable[Path | str], *, cache_dir: str | Path | None = None,
                      workers: int | None = None, progress: bool = True) -> dict[Path, str]:
    """{path: reason} of the files among `paths` that do not decode (missing ones included). Each file is
    decoded once (threads: PIL releases the GIL while decoding) and its verdict cached by name, size
    and mtime in one JSON per folder."""
    from datamodules.layout import cache_root

    paths = [Path(p) for p in paths]
    cache = cache_root(cache_dir)
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent, []).append(p)
    bad: dict[Path, str] = {}
    for folder, files in by_folder.items():
        cache_file = _cache_file(cache, folder)
        known = _load(cache_file, folder)
        stamps = {p: _stamp(p) for p in files}
        todo = [p for p in files if stamps[p] is not None and known.get(p.name, [None, None])[:2] != stamps[p]]
        if todo:
            n = workers or min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=n) as pool:
                results = pool.map(_decode_error, todo)
                if progress and len(todo) >= 200:
                    from tqdm import tqdm

                    results = tqdm(results, total=len(todo), desc=f"checking images in {folder}", leave=False)
                for p, error in zip(todo, results):
                    known[p.name] = [*stamps[p], error]
            _save(cache_file, folder, known)
        for p in files:
            error = "file not found" if stamps[p] is None else known[p.name][2]
            if error is not None:
                bad[p] = error
    return bad


def check_policy(policy: object) -> None:
    """``data.bad_images`` must be one of BAD_IMAGE_POLICIES (a one-line UserError otherwise); also run by
    the start-up checks (``cheaplunch.checks``), before any data is read."""
    if policy not in BAD_IMAGE_POLICIES:
        raise UserError(f"data.bad_images={policy!r}: must be one of {', '.join(BAD_IMAGE_POLICIES)}")


def check_images(paths: Sequence[Path | str], *, policy: str, what: str, cache_dir: str | Path | None = None,
                 progress: bool = True) -> set[Path]:
    """Apply ``data.bad_images`` to `paths` (the images of `what`, e.g. "the train split of X"): raise a
    DataError naming the first unreadable file and the count, or with ``skip`` warn once and return the
    set of unreadable files for the caller to leave out."""
    check_policy(policy)
    bad = unreadable_images(paths, cache_dir=cache_dir, progress=progress)
    if not bad:
        return set()
    first = min(bad)
    summary = f"{first}: cannot read image ({bad[first]}); {len(bad)} of {len(paths)} images of {what} are unreadable"
    if policy == "error":
        raise DataError(f"{summary}; fix or remove them, or set data.bad_images=skip to train without them")
    if (what, frozenset(bad)) not in _warned:
        _warned.add((what, frozenset(bad)))
        warnings.warn(f"{summary}; skipping them (data.bad_images=skip)", DataWarning, stacklevel=2)
    return set(bad)
