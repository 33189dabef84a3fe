"""Where the project's own files are: the repository, its configs, and the embedded default dataset."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "embedded"
