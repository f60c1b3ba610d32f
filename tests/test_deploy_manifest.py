"""deploy/kubernetes.yaml: what could break silently, checked against the real server.

/health-check answers HTTP 200 in every state (STARTING, READY, BUSY, SETUP_FAILED, UNHEALTHY,
measured with coglet 0.23.1), so the probes are exec commands running deploy/probe.py, which reads
its JSON `status` and, when BUSY, the model's liveness file (sdcog/liveness.py: a prediction is
running in the model). They run here as the kubelet runs them, with the container's environment
(PORT, else 5000) and /src/ (Cog's WORKDIR in the image) read as this checkout: against the real
server (the bundled model) while READY and while BUSY, against a stub that answers as the server
does in the other states, and against a port nothing listens on. The front (deploy/front.py) and
a stuck slot on the real server are in tests/test_stuck_slot.py.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import yaml
from test_workflows import dockerignore_patterns, ignored

from sdcog import liveness
from sdcog.model.weights import PROJECT_ROOT
from sdcog_tools.cog_server import free_port

MANIFEST = PROJECT_ROOT / "deploy" / "kubernetes.yaml"
IMAGE_ROOT = "/src/"  # where `cog build` copies the project (its Dockerfile: WORKDIR /src, COPY . /src)
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# The server's state, and what the model's liveness file says: a prediction running in the model
# ("running"), none (None), one left by a worker that died ("dead worker") or one running for
# longer than --max-prediction ("too long").
STATES = {
    "STARTING": ("STARTING", None),
    "READY": ("READY", None),
    "BUSY": ("BUSY", "running"),
    "BUSY, stuck": ("BUSY", None),
    "BUSY, a dead worker's file": ("BUSY", "dead worker"),
    "BUSY, over --max-prediction": ("BUSY", "too long"),
    "SETUP_FAILED": ("SETUP_FAILED", None),
    "UNHEALTHY": ("UNHEALTHY", None),
}
# Which probes pass in each state: startup once setup has ended (well or badly), liveness while
# the server can still serve, readiness only when it can take a prediction now.
STUCK = {"startupProbe": True, "livenessProbe": False, "readinessProbe": False}
EXPECTED = {
    "STARTING": {"startupProbe": False, "livenessProbe": False, "readinessProbe": False},
    "READY": {"startupProbe": True, "livenessProbe": True, "readinessProbe": True},
    "BUSY": {"startupProbe": True, "livenessProbe": True, "readinessProbe": False},
    "BUSY, stuck": STUCK,
    "BUSY, a dead worker's file": STUCK,
    "BUSY, over --max-prediction": STUCK,
    "SETUP_FAILED": STUCK,
    "UNHEALTHY": STUCK,
}
# Long enough to still run when the checks below are done; canceled then.
LONG = {"prompt": "a red circle", "width": 128, "height": 128, "num_outputs": 4, "num_inference_steps": 500}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", PROJECT_ROOT / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = load_script("probe")
front = load_script("front")


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text()) if document}


def containers(documents: dict[str, dict]) -> dict[str, dict]:
    return {each["name"]: each for each in documents["Deployment"]["spec"]["template"]["spec"]["containers"]}


@pytest.fixture(scope="module")
def container(documents) -> dict:
    """The model's container: the server, its probes and its preStop hook."""
    return containers(documents)["sdcog"]


def probe_command(container: dict, name: str) -> list[str]:
    if name == "preStop":
        return container["lifecycle"]["preStop"]["exec"]["command"]
    return container[name]["exec"]["command"]


def local_command(command: Sequence[str]) -> list[str]:
    """A command of the manifest as it runs here: this interpreter, /src/ read as this checkout."""
    assert command[0] == "python", "Cog's image runs its server with `python`; the scripts use the same"
    return [
        sys.executable,
        *(
            str(PROJECT_ROOT / arg.removeprefix(IMAGE_ROOT)) if arg.startswith(IMAGE_ROOT) else arg
            for arg in command[1:]
        ),
    ]


def run_probe(
    command: Sequence[str], port: int, liveness_file: Path, extra: Sequence[str] = (), timeout: float = 30
) -> subprocess.CompletedProcess:
    """The probe run as the kubelet runs it, with the container's environment."""
    environment = {**os.environ, "PORT": str(port), liveness.LIVENESS_FILE_VARIABLE: str(liveness_file)}
    return subprocess.run(
        [*local_command(command), *extra], env=environment, capture_output=True, text=True, timeout=timeout
    )


def passes(container: dict, port: int, liveness_file: Path, extra: Sequence[str] = ()) -> dict[str, bool]:
    return {
        name: run_probe(probe_command(container, name), port, liveness_file, extra).returncode == 0
        for name in PROBES
    }


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


def write_liveness_file(path: Path, kind: str | None, max_prediction: float) -> None:
    """What the model writes while a prediction runs (sdcog.liveness), in the given condition."""
    if kind is None:
        return
    pid, started = os.getpid(), time.time()
    if kind == "dead worker":
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        pid = finished.pid
    elif kind == "too long":
        started -= 2 * max_prediction
    path.write_text(json.dumps({"pid": pid, "started": started}))


def probe_arguments(container: dict, name: str):
    command = probe_command(container, name)
    assert command[1] == f"{IMAGE_ROOT}deploy/probe.py", command
    return probe.parse(command[2:])


def cogs_default_port() -> int:
    """The port `python -m cog.server.http` (the image's command) serves on without PORT."""
    source = Path(importlib.util.find_spec("cog.server.http").origin).read_text()
    return int(re.search(r"""getenv\(\s*["']PORT["']\s*,\s*["'](\d+)["']\s*\)""", source)[1])


def test_the_service_reaches_the_server_only_through_the_front(documents):
    port = cogs_default_port()
    assert port == 5000 == int(probe.DEFAULT_PORT) == int(front.DEFAULT_UPSTREAM_PORT)
    server, front_container = containers(documents)["sdcog"], containers(documents)["front"]
    # The image's command (CMD; `args` keeps its tini ENTRYPOINT), on loopback: pods cannot reach it.
    assert server["args"] == ["python", "-m", "cog.server.http", "--host", "127.0.0.1"]
    assert "command" not in server and "ports" not in server
    assert front_container["image"] == server["image"]
    assert front_container["args"][:2] == ["python", f"{IMAGE_ROOT}deploy/front.py"]
    listens_on = front.parse(front_container["args"][2:]).port
    named = {entry["name"]: entry["containerPort"] for entry in front_container["ports"]}
    assert list(named.values()) == [listens_on]
    (service_port,) = documents["Service"]["spec"]["ports"]
    assert named.get(service_port["targetPort"], service_port["targetPort"]) == listens_on
    for each in (server, front_container):
        assert "PORT" not in {variable["name"] for variable in each.get("env", [])}


def test_the_scripts_the_manifest_runs_are_in_the_image(documents, container):
    commands = [probe_command(container, name) for name in (*PROBES, "preStop")]
    commands.append(containers(documents)["front"]["args"])
    scripts = {arg for command in commands for arg in command if arg.startswith(IMAGE_ROOT)}
    assert scripts == {f"{IMAGE_ROOT}deploy/probe.py", f"{IMAGE_ROOT}deploy/front.py"}
    patterns = dockerignore_patterns((PROJECT_ROOT / ".dockerignore").read_text())
    for script in scripts:
        path = script.removeprefix(IMAGE_ROOT)
        assert (PROJECT_ROOT / path).is_file() and not ignored(path, patterns), path
    assert ignored("deploy/kubernetes.yaml", patterns)
    # The probe reads the file the model writes, where the model writes it.
    assert probe.LIVENESS_FILE_VARIABLE == liveness.LIVENESS_FILE_VARIABLE
    assert probe.DEFAULT_LIVENESS_FILE == liveness.DEFAULT_LIVENESS_FILE


def test_the_service_selects_the_deployments_pods(documents):
    deployment = documents["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    for selector in (deployment["selector"]["matchLabels"], documents["Service"]["spec"]["selector"]):
        assert selector and selector.items() <= labels.items()


def test_one_gpu_and_budgets_for_a_cold_boot_a_running_prediction_and_a_stuck_slot(documents, container):
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "nvidia.com/gpu" not in containers(documents)["front"]["resources"].get("limits", {})
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # an SDXL cold boot, with room
    grace = documents["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = probe_arguments(container, "preStop")
    assert grace >= pre_stop.settle + 60
    # Liveness waits out its grace (plus one /health-check) within the kubelet's timeout.
    alive = probe_arguments(container, "livenessProbe")
    assert container["livenessProbe"]["timeoutSeconds"] > alive.grace + probe.HTTP_TIMEOUT
    assert alive.max_prediction >= grace  # a prediction preStop would wait for is not cut short
    for name in ("startupProbe", "readinessProbe"):
        assert container[name]["timeoutSeconds"] > probe.HTTP_TIMEOUT


@pytest.mark.parametrize("state", list(STATES))
def test_each_probe_passes_in_exactly_the_states_it_should(container, tmp_path, state):
    status, kind = STATES[state]
    liveness_file = tmp_path / "liveness.json"
    write_liveness_file(liveness_file, kind, probe_arguments(container, "livenessProbe").max_prediction)
    with health_stub(status) as port:
        # A shorter grace than the manifest's, to keep this quick; the real one runs in test_stuck_slot.
        assert passes(container, port, liveness_file, extra=["--grace", "0.5"]) == EXPECTED[state]


def test_every_probe_fails_when_nothing_answers(container, tmp_path):
    port = free_port()
    assert passes(container, port, tmp_path / "liveness.json") == dict.fromkeys(PROBES, False)


@pytest.fixture(scope="module")
def server(liveness_server):
    return liveness_server


def start_long_prediction(server, prediction_id: str) -> None:
    """An async prediction of LONG (minutes on a CPU), once the server is READY; returns once it is BUSY."""
    server.settled_status()
    response = httpx.post(
        f"{server.url}/predictions",
        json={"id": prediction_id, "input": LONG},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    wait_for_status(server, "BUSY")


def wait_for_status(server, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (status := server.health()["status"]) != wanted:
        assert time.monotonic() < deadline, f"still {status}, not {wanted}"
        time.sleep(0.05)


def wait_for_the_model(liveness_file: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not liveness_file.exists():
        assert time.monotonic() < deadline, (
            "BUSY, but the model never wrote its liveness file: predict() must call "
            "sdcog.liveness.prediction_started() first and prediction_ended() in its finally"
        )
        time.sleep(0.05)


def test_against_the_real_server_ready_busy_and_prestop_waiting_for_the_prediction(
    server, container, liveness_file
):
    assert httpx.get(f"{server.url}/health-check").status_code == 200
    assert passes(container, server.port, liveness_file) == EXPECTED["READY"]

    pre_stop = None
    try:
        start_long_prediction(server, "deploy-busy")
        wait_for_the_model(liveness_file)
        assert httpx.get(f"{server.url}/health-check").status_code == 200
        # What a request routed to a busy pod gets: the reason readiness must say no.
        second = httpx.post(
            f"{server.url}/predictions", json={"input": {"prompt": "a red circle"}}, timeout=30
        )
        assert second.status_code == 409, second.text
        assert second.json() == {"error": "At capacity - all prediction slots busy", "status": "failed"}
        environment = {
            **os.environ,
            "PORT": str(server.port),
            liveness.LIVENESS_FILE_VARIABLE: str(liveness_file),
        }
        pre_stop = subprocess.Popen(local_command(probe_command(container, "preStop")), env=environment)
        started = time.monotonic()
        assert passes(container, server.port, liveness_file) == EXPECTED["BUSY"]
        # Past preStop's settling time (and its grace), it must be waiting for the prediction to end.
        arguments = probe_arguments(container, "preStop")
        time.sleep(max(0.0, started + arguments.settle + arguments.grace + 1 - time.monotonic()))
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
    assert not liveness_file.exists()
    assert passes(container, server.port, liveness_file) == EXPECTED["READY"]


def test_prestop_waits_for_predictions_in_the_model_while_the_server_still_says_ready(sd15_server, container):
    """Issue 18: with 32 slots the server says READY while predictions run and wait in the model;
    preStop waited only while BUSY, so SIGTERM dropped them."""
    environment = {
        **os.environ,
        "PORT": str(sd15_server.port),
        liveness.LIVENESS_FILE_VARIABLE: str(sd15_server.liveness_file),
    }
    # Long enough to outlast settle + grace + 1 s on any CPU (400 steps at 64x64 took under 11 s
    # once, and the hook rightly ended): it is canceled once the check is made.
    inputs = {
        "prompt": "a red circle",
        "width": 256,
        "height": 256,
        "num_outputs": 4,
        "num_inference_steps": 500,
    }
    response = httpx.post(
        f"{sd15_server.url}/predictions",
        json={"id": "drain-1", "input": inputs},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    pre_stop = None
    try:
        wait_for_the_model(sd15_server.liveness_file)
        assert sd15_server.health()["status"] == "READY"
        pre_stop = subprocess.Popen(local_command(probe_command(container, "preStop")), env=environment)
        arguments = probe_arguments(container, "preStop")
        time.sleep(arguments.settle + arguments.grace + 1)
        assert pre_stop.poll() is None  # still waiting: a prediction is in the model
        httpx.post(f"{sd15_server.url}/predictions/drain-1/cancel", timeout=30)
        assert pre_stop.wait(timeout=30) == 0
    finally:
        httpx.post(f"{sd15_server.url}/predictions/drain-1/cancel", timeout=30)
        if pre_stop is not None and pre_stop.poll() is None:
            pre_stop.kill()
            pre_stop.wait()
