"""Shared fixtures: tiny random-weight pipelines with the real architectures, built once per session."""

from pathlib import Path

import pytest
import torch

from sdcog import liveness
from sdcog.model.weights import BUNDLED_MODEL_DIR, PROJECT_ROOT
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server
from sdcog_tools.random_pipelines import save_pipeline

TINY_PRESETS = ("tiny-sd15", "tiny-sdxl")


def pytest_collection_modifyitems(config, items):
    """The GPU tier (tests marked `gpu`) runs where CUDA is; elsewhere each says how to run it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run script/test-gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    """The tiny SD 1.5 engine, one per test module (LoRAs a module loads stay in its own engine)."""
    from sdcog.generate.engine import Engine

    return Engine.load(tiny_sd15)


@pytest.fixture(scope="session")
def sd15_server(tiny_sd15, tmp_path_factory):
    """Cog's server with the tiny SD 1.5 pipeline, one for the whole session: the HTTP contract,
    async predictions and cancels, concurrency and the release gate's cases share it. Its
    liveness file is `sd15_server.liveness_file`."""
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    liveness_path = tmp_path_factory.mktemp("sd15-liveness") / "liveness.json"
    env = {"MODEL_WEIGHTS": str(tiny_sd15), liveness.LIVENESS_FILE_VARIABLE: str(liveness_path)}
    with running_server(PROJECT_ROOT, env=env) as running:
        running.liveness_file = liveness_path
        yield running


@pytest.fixture(scope="session")
def bundled_server(tmp_path_factory):
    """Cog's server with the bundled model (and its ControlNet), allowed to fetch from 127.0.0.1,
    one for the whole session: the ControlNet contract and the short memory soak share it."""
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {
        "MODEL_WEIGHTS": str(BUNDLED_MODEL_DIR),
        "SDCOG_ALLOW_LOCAL_URLS": "1",
        "SDCOG_CONTROLNET_CACHE": str(tmp_path_factory.mktemp("bundled-controlnets")),
    }
    with running_server(PROJECT_ROOT, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def liveness_file(tmp_path_factory) -> Path:
    """Where the model marks a running prediction for deploy/probe.py (one per test module)."""
    return tmp_path_factory.mktemp("liveness") / "liveness.json"


@pytest.fixture(scope="module")
def liveness_server(liveness_file):
    """Cog's server with the bundled model, marking its predictions in `liveness_file`; one per
    test module (tests/test_stuck_slot.py leaves its own wedged)."""
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {"MODEL_WEIGHTS": str(BUNDLED_MODEL_DIR), liveness.LIVENESS_FILE_VARIABLE: str(liveness_file)}
    # One slot, so that one prediction makes the server BUSY (every slot taken): the probes' BUSY
    # paths, and the stuck slot, are what they are with any number of slots, once all are taken.
    env["COG_MAX_CONCURRENCY"] = "1"
    with running_server(PROJECT_ROOT, env=env) as running:
        yield running


@pytest.fixture
def webhooks():
    """A receiver for Cog's webhooks on 127.0.0.1 (tests/webhooks.py), one per test."""
    from webhooks import WebhookReceiver

    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def local_urls(monkeypatch):
    """Let the server fetch from 127.0.0.1, where the tests serve their files."""
    monkeypatch.setenv("SDCOG_ALLOW_LOCAL_URLS", "1")


_ORACLE_FIGURES: dict = {}


@pytest.fixture(scope="session")
def oracle_figures() -> dict:
    """Figures the bundled-model oracle measured, printed at the end of the run."""
    return _ORACLE_FIGURES


def pytest_terminal_summary(terminalreporter):
    if not _ORACLE_FIGURES:
        return
    terminalreporter.section("shapes oracle: measured on the bundled model")
    for name, value in _ORACLE_FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
