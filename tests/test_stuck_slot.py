"""A stuck slot, and the sample deployment that survives it: deploy/front.py and deploy/probe.py.

Cog's server (coglet 0.23.1) makes a folder /tmp/coglet/predictions/<id> for each prediction. An
id it cannot make it for fails the prediction and leaves its only slot BUSY for good; `..%2F` in
a URL makes it outside (tests/hostile_ids.py lists the kinds). Here, against the real server with
the bundled model, the scripts run as deploy/kubernetes.yaml runs them:

- through the front, every hostile id (URL or body) is refused with 422 naming `id`, the server
  stays READY and serves the next prediction, and valid ids are served;
- on the bare server, `..%2F` writes outside its folder; the front refuses it;
- on the bare server, the liveness probe passes during a long prediction, and once a 256-character
  id has left the server BUSY for good (409 to every request) it fails within its grace.

One server for the module; the last test leaves it stuck.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from front_process import running_front
from hostile_ids import HOSTILE_IDS, HOSTILE_URL_SEGMENTS, NON_STRING_IDS, VALID_IDS, url_segment
from test_deploy_manifest import (
    LONG,
    containers,
    local_command,
    probe_arguments,
    probe_command,
    start_long_prediction,
    wait_for_status,
    wait_for_the_model,
)

from sdcog import liveness
from sdcog.model.weights import PROJECT_ROOT

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # fixed in coglet 0.23.1
FAST = {"prompt": "a red circle", "num_inference_steps": 2}
VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the rule deploy/front.py enforces


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    """The manifest's containers by name: "sdcog" (the server) and "front"."""
    documents = yaml.safe_load_all((PROJECT_ROOT / "deploy" / "kubernetes.yaml").read_text())
    return containers({document["kind"]: document for document in documents if document})


@pytest.fixture(scope="module")
def server(liveness_server):
    return liveness_server


@pytest.fixture(scope="module")
def front(server) -> int:
    """deploy/front.py as the manifest runs it, on a free loopback port; yields that port."""
    with running_front(server.port) as port:
        yield port


def send(port: int, method: str, path: str, body: object = None) -> tuple[int, dict]:
    """One request with the path sent exactly as given (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else {}
    finally:
        connection.close()


def assert_refuses_the_id(answer: tuple[int, dict], where: str, label: str) -> None:
    status, document = answer
    assert status == 422, f"{label}: {status} {document}"
    (detail,) = document["detail"]
    assert detail["loc"] == [where, "id"], label
    assert detail["msg"].startswith("id must be 1 to 64 characters"), label


def test_the_model_marks_a_running_prediction_and_a_failure_to_write_only_logs(tmp_path, monkeypatch, caplog):
    path = tmp_path / "liveness.json"
    monkeypatch.setenv(liveness.LIVENESS_FILE_VARIABLE, str(path))
    liveness.prediction_started()
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and abs(record["started"] - time.time()) < 60
    assert list(tmp_path.iterdir()) == [path]  # written whole, by a rename: no partial file left
    liveness.prediction_ended()
    liveness.prediction_ended()
    assert not path.exists()
    monkeypatch.setenv(liveness.LIVENESS_FILE_VARIABLE, str(tmp_path / "missing" / "liveness.json"))
    with caplog.at_level(logging.WARNING, logger="sdcog.liveness"):
        liveness.prediction_started()
        liveness.prediction_ended()
    assert "the liveness probe will take this prediction for a stuck slot" in caplog.text


def test_the_front_refuses_every_hostile_id_and_the_server_stays_ready(server, front):
    segments = {name: url_segment(value) for name, value in HOSTILE_IDS.items()} | HOSTILE_URL_SEGMENTS
    for name, segment in segments.items():
        label = f"URL id {name} ({segment[:30]!r})"
        assert_refuses_the_id(send(front, "PUT", f"/predictions/{segment}", {"input": FAST}), "path", label)
        assert_refuses_the_id(send(front, "POST", f"/predictions/{segment}/cancel"), "path", label)
        assert_refuses_the_id(send(front, "GET", f"/predictions/{segment}"), "path", label)
    for name, value in (HOSTILE_IDS | NON_STRING_IDS).items():
        label = f"body id {name}"
        request = {"id": value, "input": FAST}
        assert_refuses_the_id(send(front, "POST", "/predictions", request), "body", label)
        assert_refuses_the_id(send(front, "PUT", "/predictions/fine", request), "body", label)
    # The server saw none of them: it is READY and serves a prediction through the front.
    assert server.health()["status"] == "READY"
    status, answer = send(front, "POST", "/predictions", {"input": FAST})
    assert status == 200 and answer["status"] == "succeeded", answer


def test_the_front_serves_valid_ids_and_the_ones_the_server_makes(server, front):
    for name, prediction_id in VALID_IDS.items():
        server.settled_status()
        status, answer = send(front, "PUT", f"/predictions/{prediction_id}", {"input": FAST})
        assert (status, answer.get("status"), answer.get("id")) == (200, "succeeded", prediction_id), name
    server.settled_status()
    status, answer = send(front, "POST", "/predictions", {"id": VALID_IDS["UUID"], "input": FAST})
    assert (status, answer["status"]) == (200, "succeeded")
    server.settled_status()
    status, answer = send(front, "POST", "/predictions", {"id": None, "input": FAST})
    assert (status, answer["status"]) == (200, "succeeded")
    assert VALID_ID.fullmatch(answer["id"]), f"the server's own id {answer['id']!r} breaks the rule"
    assert send(front, "POST", "/shutdown")[0] == 404  # not forwarded: it would stop the server


def test_dot_dot_in_a_url_makes_the_bare_server_write_outside_its_folder_and_the_front_refuses_it(
    server, front
):
    name = f"sdcog-escape-{uuid.uuid4().hex[:12]}"
    outside = (COGLET_PREDICTIONS / ".." / ".." / name).resolve()
    assert not outside.is_relative_to(COGLET_PREDICTIONS)
    path = f"/predictions/..%2F..%2F{name}"
    try:
        assert_refuses_the_id(send(front, "PUT", path, {"input": FAST}), "path", path)
        assert not outside.exists()
        server.settled_status()
        status, answer = send(server.port, "PUT", path, {"input": FAST})
        assert (status, answer["id"], answer["status"]) == (200, f"../../{name}", "succeeded")
        assert (outside / "outputs").is_dir()  # made by the server, outside /tmp/coglet/predictions
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_client_that_hangs_up_through_the_front_cancels_its_prediction(server, front):
    server.settled_status()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"http://127.0.0.1:{front}/predictions",
            json={"id": "hangs-up", "input": LONG},
            timeout=httpx.Timeout(30, read=3),
        )
    wait_for_status(server, "READY", timeout=20)  # LONG would have run for minutes


def probe(manifest, name: str, server, liveness_file, *extra: str) -> tuple[int, str, float]:
    """The manifest's probe `name` run as the kubelet runs it: (exit status, output, seconds)."""
    environment = {
        **os.environ,
        "PORT": str(server.port),
        liveness.LIVENESS_FILE_VARIABLE: str(liveness_file),
    }
    started = time.monotonic()
    result = subprocess.run(
        [*local_command(probe_command(manifest["sdcog"], name)), *extra],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout, time.monotonic() - started


def test_liveness_passes_during_a_long_prediction(server, manifest, liveness_file):
    grace = probe_arguments(manifest["sdcog"], "livenessProbe").grace
    try:
        start_long_prediction(server, "long-one")
        wait_for_the_model(liveness_file)
        status, output, seconds = probe(manifest, "livenessProbe", server, liveness_file)
        assert status == 0 and "BUSY: a prediction has run for" in output, output
        assert seconds < grace  # it saw the prediction: no grace to wait out
        assert probe(manifest, "readinessProbe", server, liveness_file)[0] == 1
        # A prediction that runs past --max-prediction is stuck in the model.
        status, output, _ = probe(manifest, "livenessProbe", server, liveness_file, "--max-prediction", "0")
        assert status == 1 and "over --max-prediction" in output, output
    finally:
        httpx.post(f"{server.url}/predictions/long-one/cancel", timeout=30)
    wait_for_status(server, "READY")
    assert not liveness_file.exists()


def test_an_id_of_256_characters_sticks_the_bare_server_for_good_and_liveness_fails_within_its_grace(
    server, manifest, liveness_file
):
    server.settled_status()
    assert probe(manifest, "livenessProbe", server, liveness_file)[0] == 0
    # Straight to the server (no front): the prediction fails, and the slot stays taken.
    answer = httpx.put(f"{server.url}/predictions/{'a' * 256}", json={"input": FAST}, timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "failed"
    assert answer.json()["error"] == "Failed to create output dir: File name too long (os error 36)"
    status, output, seconds = probe(manifest, "livenessProbe", server, liveness_file)
    grace = probe_arguments(manifest["sdcog"], "livenessProbe").grace
    assert status == 1 and "a stuck slot" in output, output
    assert grace <= seconds < grace + 3
    assert probe(manifest, "readinessProbe", server, liveness_file)[0] == 1
    assert probe(manifest, "startupProbe", server, liveness_file)[0] == 0
    # preStop has nothing to wait for: the pod restarts at once, not after the termination budget.
    status, output, seconds = probe(manifest, "preStop", server, liveness_file, "--settle", "0")
    assert status == 0 and "a stuck slot" in output and seconds < grace + 3, output
    # For good: still BUSY, and every request refused, seconds later.
    assert server.health()["status"] == "BUSY"
    refused = httpx.post(f"{server.url}/predictions", json={"input": FAST}, timeout=30)
    assert refused.status_code == 409, refused.text
    assert refused.json() == {"error": "At capacity - all prediction slots busy", "status": "failed"}
