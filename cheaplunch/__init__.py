"""cheaplunch: cheap pre-training of vision backbones on the user's own detection/segmentation data."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "embedded"
