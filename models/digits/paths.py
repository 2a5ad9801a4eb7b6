"""Where the bundled digits model lies: a path a config names before torch or diffusers load."""

from pathlib import Path

BASE_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "base"
