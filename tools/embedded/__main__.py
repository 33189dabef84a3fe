"""``python -m tools.embedded``: build (or preview) the embedded dataset; see tools/embedded/builder.py."""

import sys

from tools.embedded.builder import main

sys.exit(main())
