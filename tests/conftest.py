"""Shared test settings."""

from pathlib import Path

# The ImageNet sample lives beside the repository (shared/), never inside it.
SAMPLE_DIR = Path(__file__).parents[2] / "shared" / "data" / "imagenet-sample"
