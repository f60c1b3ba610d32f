"""Cancellation at a denoising-step boundary, and the one thread that runs every generation.

Cog cancels an async prediction by cancelling its task: `asyncio.CancelledError` arrives where
`predict()` awaits its job (`sdcog.generate.batching.until_done`), which sets the job's
`CancelFlag`. The generation runs on its own thread and looks at the flag after each denoising
step: the job leaves its batch there (the VAE decode is skipped for it), so nothing is ever
interrupted halfway through changing shared state.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Cancelled(Exception):
    """A generation stopped at a step boundary because a cancel was requested."""


class CancelFlag:
    """Set when the request is canceled; looked at by the generation between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


_worker: ThreadPoolExecutor | None = None
_here = threading.local()
"""`_here.generating` is True on the generation thread only."""


def _mark_generation_thread() -> None:
    _here.generating = True


def generation_thread() -> ThreadPoolExecutor:
    """One long-lived thread runs every generation: torch's OpenMP thread team belongs to the
    thread that calls into torch, so a new thread per prediction would build a new team each time
    (measured: steps 25-35% slower in a fresh thread). On the CPU only the first thread to use
    OpenMP runs at full speed (measured on 2 cores: a 20-step 64 px image 0.57 s there, 1.4 s on a
    second thread), so setup loads the model on this thread too (`on_generation_thread`)."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="generation", initializer=_mark_generation_thread
        )
    return _worker


def on_generation_thread(work: Callable[[], T]) -> T:
    """Run `work()` on the generation thread and return its result (setup's warm-up: what it
    builds per thread, such as CUDA graphs and OpenMP's thread team, is then ready for requests)."""
    if getattr(_here, "generating", False):  # already there (setup's load calls its warm-up)
        return work()
    return generation_thread().submit(contextvars.copy_context().run, work).result()
