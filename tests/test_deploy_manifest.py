"""deploy/kubernetes.yaml: what could break silently, checked against the real server.

/health-check answers HTTP 200 in every state (STARTING, READY, BUSY, SETUP_FAILED, UNHEALTHY,
measured with coglet 0.23.1), so the probes are exec commands (`python -c ...`) that read its
JSON `status`. They run here as the kubelet runs them, with the container's environment (PORT,
else 5000): against the real server (the bundled model) while READY and while BUSY, against a stub
that answers as the server does for the other states, and against a port nothing listens on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from sdcog.cog_schema import write_schema
from sdcog.cog_server import free_port, running_server
from sdcog.weights import BUNDLED_MODEL_DIR, PROJECT_ROOT

MANIFEST = PROJECT_ROOT / "deploy" / "kubernetes.yaml"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# Which probes pass in each state: startup once setup has ended (well or badly), liveness while
# the server can still serve, readiness only when it can take a prediction now.
EXPECTED = {
    "STARTING": {"startupProbe": False, "livenessProbe": False, "readinessProbe": False},
    "READY": {"startupProbe": True, "livenessProbe": True, "readinessProbe": True},
    "BUSY": {"startupProbe": True, "livenessProbe": True, "readinessProbe": False},
    "SETUP_FAILED": {"startupProbe": True, "livenessProbe": False, "readinessProbe": False},
    "UNHEALTHY": {"startupProbe": True, "livenessProbe": False, "readinessProbe": False},
}
# Long enough to still run when the checks below are done; canceled then.
LONG = {"prompt": "a red circle", "width": 128, "height": 128, "num_outputs": 4, "num_inference_steps": 500}


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text()) if document}


@pytest.fixture(scope="module")
def container(documents) -> dict:
    (only,) = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def probe_command(container: dict, name: str) -> list[str]:
    if name == "preStop":
        return container["lifecycle"]["preStop"]["exec"]["command"]
    return container[name]["exec"]["command"]


def run_probe(command: list[str], port: int, timeout: float = 15) -> int:
    """The probe's exit code, run with the container's `python` (here: this interpreter)."""
    assert command[0] == "python", "Cog's image runs its server with `python`; the probes use the same"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode


def passes(container: dict, port: int) -> dict[str, bool]:
    return {name: run_probe(probe_command(container, name), port) == 0 for name in PROBES}


@contextmanager
def health_stub(status: str) -> Iterator[int]:
    """A server that answers GET /health-check as coglet does (200, the state in `status`); 404 else."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health-check":
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps({"status": status, "setup": {"status": "starting"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def prestop_settle_seconds(container: dict) -> float:
    """How long preStop waits before it looks at the server (the Service's time to stop routing)."""
    return float(re.search(r"time\.sleep\((\d+(?:\.\d+)?)\)", probe_command(container, "preStop")[-1])[1])


def cogs_default_port() -> int:
    """The port `python -m cog.server.http` (the image's command) serves on without PORT."""
    source = Path(importlib.util.find_spec("cog.server.http").origin).read_text()
    return int(re.search(r"""getenv\(\s*["']PORT["']\s*,\s*["'](\d+)["']\s*\)""", source)[1])


def test_the_container_port_is_the_one_cog_serves_on(documents, container):
    port = cogs_default_port()
    assert port == 5000
    assert [entry["containerPort"] for entry in container["ports"]] == [port]
    assert "PORT" not in {variable["name"] for variable in container.get("env", [])}
    for name in (*PROBES, "preStop"):
        assert "/health-check" in probe_command(container, name)[-1]
        assert f"os.environ.get('PORT', '{port}')" in probe_command(container, name)[-1]
    (service_port,) = documents["Service"]["spec"]["ports"]
    named = {entry.get("name"): entry["containerPort"] for entry in container["ports"]}
    assert named.get(service_port["targetPort"], service_port["targetPort"]) == port


def test_the_service_selects_the_deployments_pods(documents):
    deployment = documents["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    for selector in (deployment["selector"]["matchLabels"], documents["Service"]["spec"]["selector"]):
        assert selector and selector.items() <= labels.items()


def test_one_gpu_and_budgets_for_a_cold_boot_and_a_running_prediction(documents, container):
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # an SDXL cold boot, with room
    grace = documents["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= prestop_settle_seconds(container) + 60


@pytest.mark.parametrize("status", ["STARTING", "SETUP_FAILED", "UNHEALTHY", "READY", "BUSY"])
def test_each_probe_passes_in_exactly_the_states_it_should(container, status):
    with health_stub(status) as port:
        assert passes(container, port) == EXPECTED[status]


def test_every_probe_fails_when_nothing_answers(container):
    port = free_port()
    assert passes(container, port) == dict.fromkeys(PROBES, False)


@pytest.fixture(scope="module")
def server():
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    with running_server(PROJECT_ROOT, env={"MODEL_WEIGHTS": str(BUNDLED_MODEL_DIR)}) as running:
        yield running


def wait_for_status(server, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (status := server.health()["status"]) != wanted:
        assert time.monotonic() < deadline, f"still {status}, not {wanted}"
        time.sleep(0.05)


def test_against_the_real_server_ready_busy_and_prestop_waiting_for_the_prediction(server, container):
    assert httpx.get(f"{server.url}/health-check").status_code == 200
    assert passes(container, server.port) == EXPECTED["READY"]

    response = httpx.post(
        f"{server.url}/predictions",
        json={"id": "deploy-busy", "input": LONG},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    pre_stop = None
    try:
        wait_for_status(server, "BUSY")
        assert httpx.get(f"{server.url}/health-check").status_code == 200
        # What a request routed to a busy pod gets: the reason readiness must say no.
        second = httpx.post(
            f"{server.url}/predictions", json={"input": {"prompt": "a red circle"}}, timeout=30
        )
        assert second.status_code == 409, second.text
        assert second.json() == {"error": "At capacity - all prediction slots busy", "status": "failed"}
        environment = {**os.environ, "PORT": str(server.port)}
        pre_stop = subprocess.Popen(
            [sys.executable, *probe_command(container, "preStop")[1:]], env=environment
        )
        started = time.monotonic()
        assert passes(container, server.port) == EXPECTED["BUSY"]
        # Past preStop's settling time, it must be waiting for the prediction to end.
        time.sleep(max(0.0, started + prestop_settle_seconds(container) + 1 - time.monotonic()))
        assert server.health()["status"] == "BUSY", "the prediction ended before the check; make LONG longer"
        assert pre_stop.poll() is None
        httpx.post(f"{server.url}/predictions/deploy-busy/cancel", timeout=30)
        assert pre_stop.wait(timeout=30) == 0  # returns once the prediction has stopped
    finally:
        httpx.post(f"{server.url}/predictions/deploy-busy/cancel", timeout=30)
        if pre_stop is not None and pre_stop.poll() is None:
            pre_stop.kill()
            pre_stop.wait()
    wait_for_status(server, "READY")
    assert passes(container, server.port) == EXPECTED["READY"]
