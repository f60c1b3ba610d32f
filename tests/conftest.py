"""Shared fixtures: tiny random-weight pipelines with the real architectures, built once per session."""

from pathlib import Path

import pytest

from sdcog.random_pipelines import save_pipeline

TINY_PRESETS = ("tiny-sd15", "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {preset: save_pipeline(preset, root / preset, seed=0) for preset in TINY_PRESETS}


@pytest.fixture(scope="session")
def tiny_sd15(tiny_pipelines) -> Path:
    return tiny_pipelines["tiny-sd15"]


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_pipelines) -> Path:
    return tiny_pipelines["tiny-sdxl"]
