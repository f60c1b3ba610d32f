"""Cancellation at a denoising-step boundary.

Cog cancels a running prediction by injecting its `CancelationException` into the thread that runs
`predict()` (`PyThreadState_SetAsyncExc`). Left alone, that exception lands at whatever Python line
is running at the time: inside the UNet, in diffusers' bookkeeping, or halfway through changing
shared state. So the generation runs in a worker thread instead, and the predict thread only waits
for it. When the exception arrives in the waiting thread, it sets a flag; the pipeline's step
callback sees the flag after the current step and raises `Cancelled`, which unwinds the pipeline
before its next step (and before the VAE decode); the waiting thread then re-raises Cog's exception,
so Cog reports the prediction as canceled. Nothing is ever interrupted halfway.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

POLL_SECONDS = 0.02
"""How often the waiting thread runs Python code, so an injected exception is noticed promptly."""


class Cancelled(Exception):
    """A generation stopped at a step boundary because a cancel was requested."""


class CancelFlag:
    """Set by the waiting thread, checked by the generation between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, where: str) -> None:
        """Raise `Cancelled` if a cancel was requested."""
        if self._event.is_set():
            raise Cancelled(f"canceled {where}")


def run_cancellable(work: Callable[[CancelFlag], T], name: str = "generation") -> T:
    """Run `work(flag)` in a worker thread; an exception injected into this thread cancels it.

    Returns what `work` returns, or raises what it raised. If this (waiting) thread receives an
    asynchronous exception (Cog's CancelationException, or KeyboardInterrupt), the flag is set,
    the worker is awaited until it stops at its next check, and the exception is re-raised.
    """
    flag = CancelFlag()
    outcome: dict[str, object] = {}
    # The worker sees this thread's context variables (Cog routes a prediction's logs by them).
    context = contextvars.copy_context()

    finished = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = context.run(work, flag)
        except BaseException as error:  # handed to the waiting thread, raised there
            outcome["error"] = error
        finally:
            finished.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    interrupt: BaseException | None = None
    # Poll with sleep rather than Thread.join: an exception injected while join() waits makes
    # join() mark the still-running thread as stopped (CPython's bpo-45274 handling).
    while not finished.is_set():
        try:
            time.sleep(POLL_SECONDS)
        except BaseException as error:  # Cog's CancelationException is a BaseException
            interrupt = interrupt or error
            flag.set()
    if interrupt is not None:
        if isinstance(outcome.get("error"), Cancelled):
            log.info("%s", outcome["error"])
        raise interrupt
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
