"""Start Cog's own HTTP server (coglet, as in the container) on 127.0.0.1, and stop it.

Used by `script/predict` and by the HTTP tests. The server is `python -m cog.server.http` with
the predictor named in COG_PREDICT_TYPE_STUB, run from the directory holding predict.py and
`.cog/openapi_schema.json` (which it validates inputs against). It starts its worker with the
first `python` on PATH, so this interpreter's directory goes first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

READY = "READY"
SETUP_FAILED = "SETUP_FAILED"


class ServerError(RuntimeError):
    """The server did not become ready; the message carries the end of its log."""


def max_concurrency(cog_yaml: Path) -> int:
    """cog.yaml's `concurrency.max` (1 when absent), which `cog build` turns into COG_MAX_CONCURRENCY."""
    try:
        config = yaml.safe_load(cog_yaml.read_text()) or {}
    except OSError:
        return 1
    return int((config.get("concurrency") or {}).get("max") or 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class CogServer:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health-check", timeout=10).json()

    def settled_status(self, timeout: float = 5) -> str:
        """The health-check status once it is no longer BUSY (or after `timeout` seconds).

        coglet 0.23 answers a prediction a few milliseconds before it frees the slot, so a
        status read right after an answer may still say BUSY.
        """
        deadline = time.monotonic() + timeout
        status = self.health()["status"]
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.005)
            status = self.health()["status"]
        return status

    def train(self, inputs: Mapping[str, object], timeout: float = 3600, **extra: object) -> httpx.Response:
        """A synchronous training: POST /trainings (a server started with `train=True`)."""
        self.settled_status()
        return httpx.post(f"{self.url}/trainings", json={"input": dict(inputs), **extra}, timeout=timeout)

    def predict(self, inputs: Mapping[str, object], timeout: float = 600, **extra: object) -> httpx.Response:
        """A synchronous prediction: POST /predictions and wait for the answer.

        Waits until the server is not BUSY first (see `settled_status`): with one slot (the probe
        tests' servers), a request sent right after an answer may otherwise get 409.
        """
        self.settled_status()
        return httpx.post(f"{self.url}/predictions", json={"input": dict(inputs), **extra}, timeout=timeout)


def _wait_until_ready(server: CogServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            status = server.health().get("status")
        except (httpx.TransportError, ValueError):
            status = None
        if status == READY:
            return
        if status == SETUP_FAILED:
            break
        time.sleep(0.2)
    tail = "\n".join(server.log().splitlines()[-40:])
    reason = f"status {status}" if status else f"no answer within {timeout:.0f} s"
    if server.process.poll() is not None:
        reason = f"exited with code {server.process.returncode}"
    try:
        setup = server.health().get("setup", {})
        tail = setup.get("logs", "") + "\n" + tail
    except (httpx.TransportError, ValueError):
        pass
    raise ServerError(f"the Cog server on {server.url} did not become ready ({reason}). Its log:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@contextmanager
def running_server(
    cwd: Path,
    predictor_ref: str = "predict.py:Predictor",
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    train: bool = False,
) -> Iterator[CogServer]:
    """Run the server from `cwd` on a free loopback port until the block ends; yields once READY.
    With `train`, in training mode (`--x-mode train`, serving /trainings) for `predictor_ref`'s
    training function, as the image runs `cog train`."""
    port = free_port()
    environment = {
        **os.environ,
        # What the image's Dockerfile sets from cog.yaml's concurrency.max.
        "COG_MAX_CONCURRENCY": str(max_concurrency(Path(cwd) / "cog.yaml")),
        **(env or {}),
        "PORT": str(port),
        ("COG_TRAIN_TYPE_STUB" if train else "COG_PREDICT_TYPE_STUB"): predictor_ref,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    with tempfile.NamedTemporaryFile("wb", prefix="cog-server-", suffix=".log", delete=False) as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cog.server.http",
                "--host",
                "127.0.0.1",
                *(["--x-mode", "train"] if train else []),
            ],
            cwd=cwd,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = CogServer(
        url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=Path(log_file.name)
    )
    try:
        _wait_until_ready(server, timeout)
        yield server
    finally:
        _stop(process)
        server.log_path.unlink(missing_ok=True)
