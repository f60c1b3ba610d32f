"""Tell the liveness probe (deploy/probe.py) whether a prediction is running in the model.

Cog's server (coglet 0.23.1) says BUSY on /health-check both while a prediction runs and after a
prediction id it could not make a folder for (256 bytes long, or with a NUL) left its only slot
taken for good. Only the model knows which: `predict()` calls `prediction_started()` first and
`prediction_ended()` in its `finally`, and the file named by SDCOG_LIVENESS_FILE (default
/tmp/sdcog-liveness.json) exists in between, holding the worker's pid and the start time. The
probe takes BUSY with no such file for a stuck slot. Two small file operations per prediction,
none per step; a failure to write is logged and never fails the prediction.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

LIVENESS_FILE_VARIABLE = "SDCOG_LIVENESS_FILE"
DEFAULT_LIVENESS_FILE = "/tmp/sdcog-liveness.json"

log = logging.getLogger(__name__)


def liveness_file() -> Path:
    return Path(os.environ.get(LIVENESS_FILE_VARIABLE) or DEFAULT_LIVENESS_FILE)


_running = 0
_lock = threading.Lock()


def prediction_started() -> None:
    """Record that a prediction is in the model from now: the file exists while any is (running
    or queued), and its `started` is the last time one started or ended, so that the probe tells a
    busy model (its predictions come and go) from a hung one (none has moved for a long time)."""
    global _running
    with _lock:
        _running += 1
        _write()


def prediction_ended() -> None:
    global _running
    with _lock:
        _running = max(0, _running - 1)
        if _running == 0:
            _remove()
        else:
            _write()


def _write() -> None:
    """The file, replaced atomically."""
    path = liveness_file()
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
        os.replace(partial, path)
    except OSError as error:
        log.warning(
            "cannot write %s (%s): the liveness probe will take this prediction for a stuck slot",
            path,
            error,
        )


def _remove() -> None:
    try:
        liveness_file().unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s (%s)", liveness_file(), error)
