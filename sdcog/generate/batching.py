"""Requests that wait together run together: a queue in front of the engine that batches them.

Cog's server runs up to `concurrency.max` predictions at once (cog.yaml); each hands its resolved
request and fetched adapters to `Batcher.submit` and awaits the job. One generation thread takes
the oldest waiting job and, with batching on, every other waiting job that would build the same
pipeline and the same tensor shapes (`batch_key`: mode, size, steps, scheduler, guidance,
strength, number of images, safety checker, LoRAs and their scales, embeddings, ControlNets
and their settings), up to the
family's pixel budget, and runs them as one pipeline call (`Engine.generate_batch`). Other jobs
wait their turn in arrival order.

Each job keeps what it would have alone: its own seeds (each image's noise comes from its own
generator), progress lines, cancel, errors and outputs. Its pixels equal the pixels of the same
request run alone up to the rounding of batched arithmetic; with batching off
(`SDCOG_BATCHING=0`) every job runs alone and the pixels are bit-identical to a lone request's. A
batch that runs out of GPU memory, or fails otherwise, is split in halves and retried, down to
single jobs, so each error reaches the request it belongs to.

Operator settings:
- `SDCOG_BATCHING` (default on): 0/false/off runs each request alone;
- `SDCOG_MAX_BATCH` (default 8): the most requests in one batch;
- `SDCOG_QUEUE_TIMEOUT_S` (default 600): a request still waiting after this long fails with a
  message that says so (the ones ahead of it took too long).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdcog.fetch.adapter_cache import FetchedAdapters
from sdcog.generate.cancellation import CancelFlag, Cancelled, generation_thread
from sdcog.generate.generation import Generation
from sdcog.resolve.request import GenerationRequest, Mode

if TYPE_CHECKING:
    from sdcog.generate.engine import Engine

log = logging.getLogger(__name__)

BATCHING_ENV = "SDCOG_BATCHING"
MAX_BATCH_ENV = "SDCOG_MAX_BATCH"
QUEUE_TIMEOUT_ENV = "SDCOG_QUEUE_TIMEOUT_S"
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_TIMEOUT_S = 600.0


class QueueTimeout(RuntimeError):
    """A request waited in the queue longer than SDCOG_QUEUE_TIMEOUT_S."""


class BatchFailed(RuntimeError):
    """A batch of several jobs failed as a whole (out of memory, or another error); the caller
    splits it and runs the parts, so that each job gets its own outcome."""


def batch_key(request: GenerationRequest, adapters: FetchedAdapters) -> tuple:
    """Equal for requests whose pipelines and tensors would be identical but for prompts, seeds
    and input images. The prompts' shapes (plain text, or embeddings of so many windows) are
    compared later, once they are encoded (see `Engine.generate_batch`).

    Inpainting with several images per request runs alone: diffusers encodes a lone request's
    input image once, with its first image's generator, which a batch of several input images
    cannot reproduce."""
    inpainting = request.mode == Mode.INPAINT or request.inpainting_model
    alone = object() if inpainting and request.num_outputs > 1 else None
    return (
        alone,
        request.mode,
        request.width,
        request.height,
        request.num_inference_steps,
        request.scheduler,
        request.guidance_scale,
        request.few_step,
        request.clip_skip,
        request.prompt_strength if request.mode != Mode.TEXT_TO_IMAGE else None,
        request.num_outputs,
        request.disable_safety_checker,
        tuple((lora.file.sha256, lora.scale) for lora in adapters.loras),
        tuple((embedding.file.sha256, embedding.token) for embedding in adapters.embeddings),
        tuple((controlnet.hash, controlnet.control.key) for controlnet in adapters.controlnets),
    )


@dataclass(eq=False)
class Job:
    """One request on its way through the queue and the engine."""

    request: GenerationRequest
    adapters: FetchedAdapters = field(default_factory=FetchedAdapters)
    cancel: CancelFlag = field(default_factory=CancelFlag)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    """The submitter's context variables: Cog routes a prediction's log lines by them."""
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    denoised: float | None = None
    """When its last denoising step ended (the decode follows)."""
    finished: float | None = None
    batch_size: int = 1

    @property
    def key(self) -> tuple:
        return batch_key(self.request, self.adapters)

    @property
    def pixels(self) -> int:
        return self.request.width * self.request.height * self.request.num_outputs

    @property
    def done(self) -> bool:
        return self.future.done()

    def log(self, level: int, message: str, *arguments: object, logger: logging.Logger = log) -> None:
        """Log in the submitter's context, so the line joins its prediction's logs."""
        self.context.run(logger.log, level, message, *arguments)

    def finish(self, outcome: Generation | BaseException) -> None:
        """Set the job's result or error (once: a job that left the batch keeps its first)."""
        if self.future.done():
            return
        self.finished = time.monotonic()
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)

    def timings(self) -> dict[str, float]:
        """Seconds spent waiting in the queue, denoising, and decoding (with the safety checker)."""
        started = self.started if self.started is not None else self.finished or self.submitted
        times = {"queue_wait_s": started - self.submitted}
        if self.denoised is not None:
            times["denoise_s"] = self.denoised - started
            if self.finished is not None:
                times["decode_s"] = self.finished - self.denoised
        return times


async def until_done(job: Job) -> Generation:
    """The job's Generation, or its error. If the awaiting task is cancelled (Cog cancels an async
    prediction so), the job is canceled too: it leaves the queue, or its batch at the next step."""
    try:
        return await asyncio.shield(asyncio.wrap_future(job.future))
    except asyncio.CancelledError:
        job.cancel.set()
        raise


def batching_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(BATCHING_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


class Batcher:
    """The queue in front of the engine; see the module's docstring."""

    def __init__(
        self,
        engine: Engine,
        batching: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self.batching = batching
        self.max_batch = max(1, max_batch)
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._running = False

    @classmethod
    def from_environment(cls, engine: Engine, environ: Mapping[str, str] = os.environ) -> Batcher:
        return cls(
            engine,
            batching=batching_enabled(environ),
            max_batch=int(environ.get(MAX_BATCH_ENV) or DEFAULT_MAX_BATCH),
            queue_timeout=float(environ.get(QUEUE_TIMEOUT_ENV) or DEFAULT_QUEUE_TIMEOUT_S),
        )

    def submit(self, request: GenerationRequest, adapters: FetchedAdapters | None = None) -> Job:
        """Queue the request; the returned job's `future` holds its Generation or its error."""
        (job,) = self.submit_all([(request, adapters)])
        return job

    def submit_all(self, requests: Sequence[tuple[GenerationRequest, FetchedAdapters | None]]) -> list[Job]:
        """Queue the requests at once, in order, before the generation thread takes any: their
        batches are then the same on every run (the oracles compare runs pixel for pixel)."""
        jobs = [
            Job(request, adapters or FetchedAdapters(), submitted=self._clock())
            for request, adapters in requests
        ]
        with self._lock:
            waiting = len(self._queue)
            self._queue.extend(jobs)
            start = not self._running
            self._running = True
        if waiting:
            for job in jobs:
                job.log(logging.INFO, "queued behind %d request(s)", waiting)
        if start:
            generation_thread().submit(self._drain)
        return jobs

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def _drain(self) -> None:
        """On the generation thread: run batches until the queue is empty."""
        while True:
            with self._lock:
                batch = self._take_batch()
                if not batch:
                    self._running = False
                    return
            try:
                self._run(batch)
            except BaseException as error:  # never leave a submitter waiting
                for job in batch:
                    job.finish(error)

    def _take_batch(self) -> list[Job]:
        """The oldest live job and the waiting jobs that can join it (under the lock)."""
        now = self._clock()
        live = []
        for job in self._queue:
            if job.cancel.is_set():
                job.finish(Cancelled("canceled while waiting in the queue"))
            elif now - job.submitted > self.queue_timeout:
                job.log(logging.WARNING, "waited %.0f s in the queue: giving up", now - job.submitted)
                job.finish(
                    QueueTimeout(
                        f"waited {now - job.submitted:.0f} s in the queue, longer than {QUEUE_TIMEOUT_ENV}="
                        f"{self.queue_timeout:g}: the server is overloaded; try again later"
                    )
                )
            else:
                live.append(job)
        if not live:
            self._queue = []
            return []
        head = live[0]
        batch = [head]
        if self.batching:
            budget = max(self.engine.family.pixel_budget, head.pixels)
            pixels = head.pixels
            for job in live[1:]:
                if len(batch) >= self.max_batch:
                    break
                if job.key == head.key and pixels + job.pixels <= budget:
                    batch.append(job)
                    pixels += job.pixels
        self._queue = [job for job in live if job not in batch]
        return batch

    def _requeue(self, jobs: list[Job]) -> None:
        """Put jobs back at the front, in their order (they were the oldest)."""
        with self._lock:
            self._queue = [*jobs, *self._queue]

    def _run(self, batch: list[Job]) -> None:
        started = self._clock()
        for job in batch:
            job.started = started
            job.batch_size = len(batch)
        if len(batch) > 1:
            log.info("running %d requests as one batch", len(batch))
        try:
            deferred = self.engine.generate_batch(batch)
        except BatchFailed as error:
            half = len(batch) // 2
            log.warning("a batch of %d failed (%s): running it in two parts", len(batch), error)
            self._run(batch[:half])
            self._run(batch[half:])
            return
        if deferred:
            self._requeue(deferred)
