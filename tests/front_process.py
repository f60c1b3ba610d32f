"""deploy/front.py run as the Kubernetes sample runs it, on a free loopback port, for the tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from test_deploy_manifest import containers, local_command

from sdcog.model.weights import PROJECT_ROOT


def front_command() -> list[str]:
    """The manifest's front container command, as it runs here."""
    documents = yaml.safe_load_all((PROJECT_ROOT / "deploy" / "kubernetes.yaml").read_text())
    front = containers({document["kind"]: document for document in documents if document})["front"]
    return local_command(front["args"])


@contextmanager
def running_front(upstream_port: int) -> Iterator[int]:
    """The front in front of 127.0.0.1:`upstream_port`; yields its own port; exits cleanly on SIGTERM."""
    process = subprocess.Popen(
        [*front_command(), "--host", "127.0.0.1", "--port", "0"],
        env={**os.environ, "PORT": str(upstream_port)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()  # "front on 127.0.0.1:<port>, to 127.0.0.1:<server port>"
        yield int(re.search(r"127\.0\.0\.1:(\d+),", banner)[1])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
