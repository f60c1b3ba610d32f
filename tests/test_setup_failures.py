"""Damaged weights through Cog's real HTTP server: setup fails, and says which file and what to run.

One server start per case (each costs seconds); the cases themselves are unit-tested in
tests/test_weights_check.py.
"""

import json
import shutil

import httpx
import pytest

from sdcog.model.weights import BUNDLED_MODEL_DIR, PROJECT_ROOT, SOURCE_FILE
from sdcog_tools import cog_server
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import SETUP_FAILED, ServerError, running_server


@pytest.fixture(scope="module")
def schema_file():
    return write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")


def failed_setup(monkeypatch, weights_dir) -> tuple[dict, str]:
    """Start the server on `weights_dir`, expecting setup to fail: the last health-check answer
    (read before the server is stopped) and the ServerError's text."""
    health: dict = {}
    wait_until_ready = cog_server._wait_until_ready

    def wait_and_keep_health(server, timeout):
        try:
            wait_until_ready(server, timeout)
        finally:
            try:
                health.update(server.health())
            except (httpx.TransportError, ValueError):
                pass

    monkeypatch.setattr(cog_server, "_wait_until_ready", wait_and_keep_health)
    with pytest.raises(ServerError) as failure:
        with running_server(PROJECT_ROOT, env={"MODEL_WEIGHTS": str(weights_dir)}, timeout=120):
            pass
    return health, str(failure.value)


def test_truncated_weights_answer_setup_failed_naming_the_file_and_the_command(
    schema_file, monkeypatch, tmp_path
):
    weights_dir = tmp_path / "downloaded"
    shutil.copytree(BUNDLED_MODEL_DIR, weights_dir)
    source = {"model_id": "org/some-sd", "revision": "0" * 40, "variant": None}
    (weights_dir / SOURCE_FILE).write_text(json.dumps(source))
    unet = weights_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with unet.open("r+b") as file:
        file.truncate(unet.stat().st_size // 2)  # an interrupted copy

    health, error = failed_setup(monkeypatch, weights_dir)

    assert health["status"] == SETUP_FAILED, health
    logs = health["setup"]["logs"]
    assert f"WeightsError: {unet} is truncated" in logs
    assert f"`script/download-weights org/some-sd --dest {weights_dir}`" in logs
    assert f"status {SETUP_FAILED}" in error and f"{unet} is truncated" in error
