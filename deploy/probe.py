"""The probes and preStop hook of deploy/kubernetes.yaml: one script, one mode each.

    python /src/deploy/probe.py startup|readiness|liveness|prestop [--grace S] [--max-prediction S]

Exit status 0 passes; the reason for a failure is printed (`kubectl describe pod` shows it).
Stdlib only: it runs in the model's container, with its `python`. It reads the `status` of Cog's
GET /health-check on 127.0.0.1:$PORT (5000 unless PORT is set), which answers HTTP 200 in every
state, and the model's liveness file (sdcog/liveness.py: it exists while a prediction is in the
model, running or queued, and holds the last time one started or ended).

- startup:   setup has ended, well or not: anything but STARTING.
- readiness: READY: the server can take a prediction now.
- liveness:  READY, or BUSY (every slot taken) with predictions in the model, one of which started
             or ended at most --max-prediction seconds ago. BUSY with none running for --grace
             seconds is a stuck slot: Cog's server
             (coglet 0.23.1) stays BUSY for good after a prediction id it could not make a folder
             for (deploy/front.py refuses those ids), and an answered prediction frees its slot
             a few milliseconds after predict() returns (more with --upload-url), which the grace
             covers. SETUP_FAILED, UNHEALTHY and no answer fail at once.
- prestop:   waits --settle seconds (the Service stops routing here), then as long as a
             prediction is in the model, running or queued (the server says READY meanwhile when
             it has free slots); returns once none is and the server is not BUSY, or after
             --grace seconds of a stuck slot, so that a stuck pod restarts at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PORT = "5000"  # where `python -m cog.server.http` listens without PORT
LIVENESS_FILE_VARIABLE = "SDCOG_LIVENESS_FILE"  # the same as in sdcog/liveness.py
DEFAULT_LIVENESS_FILE = "/tmp/sdcog-liveness.json"
HTTP_TIMEOUT = 3.0
POLL = 0.2


def health_status() -> str:
    url = f"http://127.0.0.1:{os.environ.get('PORT', DEFAULT_PORT)}/health-check"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return json.load(response)["status"]


def prediction_started_at() -> float | None:
    """When the prediction running in the model started (time.time()), or None if none runs."""
    path = Path(os.environ.get(LIVENESS_FILE_VARIABLE) or DEFAULT_LIVENESS_FILE)
    try:
        record = json.loads(path.read_text())
        pid, started = int(record["pid"]), float(record["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by a worker that died
    except PermissionError:
        pass
    return started


def liveness(grace: float, max_prediction: float) -> tuple[bool, str]:
    deadline = time.monotonic() + grace
    while True:
        status = health_status()
        if status != "BUSY":
            return status == "READY", status
        started = prediction_started_at()
        if started is not None:
            seconds = time.time() - started
            if seconds > max_prediction:
                return False, f"BUSY: a prediction has run for {seconds:.0f} s, over --max-prediction"
            return True, f"BUSY: a prediction has run for {seconds:.0f} s"
        if time.monotonic() >= deadline:
            return False, f"BUSY for {grace:g} s with no prediction running in the model: a stuck slot"
        time.sleep(POLL)


def prestop(settle: float, grace: float) -> tuple[bool, str]:
    """Wait while any prediction is in the model (running or queued: the server may say READY
    meanwhile, having free slots), and while BUSY until a stuck slot shows itself."""
    time.sleep(settle)
    stuck_since = None
    while True:
        if prediction_started_at() is not None:
            stuck_since = None
        else:
            status = health_status()
            if status != "BUSY":
                return True, status
            if stuck_since is None:
                stuck_since = time.monotonic()
            elif time.monotonic() - stuck_since >= grace:
                return True, "a stuck slot: no prediction to wait for"
        time.sleep(POLL)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["startup", "readiness", "liveness", "prestop"])
    parser.add_argument("--grace", type=float, default=5, help="seconds of BUSY with no prediction")
    parser.add_argument("--max-prediction", type=float, default=1800, help="seconds one may run")
    parser.add_argument("--settle", type=float, default=5, help="prestop: seconds before looking")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.mode == "startup":
            status = health_status()
            passed, reason = status != "STARTING", status
        elif args.mode == "readiness":
            status = health_status()
            passed, reason = status == "READY", status
        elif args.mode == "liveness":
            passed, reason = liveness(args.grace, args.max_prediction)
        else:
            passed, reason = prestop(args.settle, args.grace)
    except (OSError, ValueError, KeyError, TypeError) as error:  # no answer, or not coglet's JSON
        passed, reason = False, f"/health-check: {error}"
    print(f"{args.mode}: {'pass' if passed else 'fail'}: {reason}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
