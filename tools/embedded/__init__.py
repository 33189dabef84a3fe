"""The embedded default dataset generator (``tools.embedded.builder``), its curated stamp list
(``stamps.tsv``) and the curation script (``curate_stamps``).

    python -m tools.embedded --out data/embedded [--size 300] [--seed 0] [--image-size 256]
    python -m tools.embedded.curate_stamps [--sheet /tmp/stamps.png]

The public API is re-exported here; import ``tools.embedded.builder`` itself to patch its module globals
(``STAMP_ROOT``, ``STAMP_LIST``) in tests.
"""

from tools.embedded.builder import (
    CLASSES,
    STAMP_LIST,
    STAMP_ROOT,
    EmbeddedConfig,
    build_embedded,
    main,
    read_build_info,
    read_stamp_list,
    write_preview,
)

__all__ = [
    "CLASSES",
    "STAMP_LIST",
    "STAMP_ROOT",
    "EmbeddedConfig",
    "build_embedded",
    "main",
    "read_build_info",
    "read_stamp_list",
    "write_preview",
]
