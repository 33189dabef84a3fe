"""The embedded default dataset generator (``tools.embedded.builder``), where its pixels come from
(``sources``: the curated stamp list ``stamps.tsv``, background photos), its picture (``preview``) and the curation
script (``curate_stamps``).

    python -m tools.embedded --out data/embedded [--size 300] [--seed 0] [--image-size 256]
    python -m tools.embedded.curate_stamps [--sheet /tmp/stamps.png]

The public API is re-exported here; tests patch ``tools.embedded.sources.STAMP_ROOT`` / ``STAMP_LIST`` (the
stamps and background photos the builder composites).
"""

from tools.embedded.builder import EmbeddedConfig, build_embedded, main, read_build_info
from tools.embedded.preview import write_preview
from tools.embedded.sources import CLASSES, STAMP_LIST, STAMP_ROOT, read_stamp_list

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
