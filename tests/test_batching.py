"""Requests that wait together run as one batch, each keeping its own seeds, cancel and errors
(issue 18). The engine's batches on tiny pipelines; the queue's grouping with a recording engine."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterFile, FetchedAdapters, FetchedLora
from sdcog.generate.batching import Batcher, BatchFailed, Job, QueueTimeout
from sdcog.generate.cancellation import CancelFlag, Cancelled
from sdcog.generate.engine import Engine
from sdcog.model.families import SD1
from sdcog.resolve.request import ModelLimits, resolve_request

SIZE = dict(width=64, height=64, num_inference_steps=4)
LIMITS = ModelLimits(family=SD1, native_width=512, native_height=512)


def pixels(generation) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return Engine.load(tiny_sdxl)


@pytest.fixture(scope="module")
def images():
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return {"txt2img": {}, "img2img": {"image": init}, "inpaint": {"image": init, "mask": mask}}


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("engine_name", ["sd15", "sdxl"])
def test_a_batch_gives_each_request_the_pixels_it_gets_alone(request, images, mode, engine_name):
    engine = request.getfixturevalue(engine_name)
    num_outputs = 1 if mode == "inpaint" else 2  # inpainting with several images runs alone
    requests = [
        resolve_request(
            engine.limits,
            prompt=f"a red circle {index}",
            seed=11 * index + 3,
            num_outputs=num_outputs,
            **SIZE,
            **images[mode],
        )
        for index in range(3)
    ]
    alone = [pixels(engine.generate(each)) for each in requests]
    jobs = [Job(each) for each in requests]
    assert engine.generate_batch(jobs) == []
    for job, expected in zip(jobs, alone, strict=True):
        generation = job.future.result(timeout=120)
        assert len(generation.images) == num_outputs
        # Batched arithmetic rounds differently: at most a level or two of 255 (measured: 0-1).
        assert np.abs(pixels(generation) - expected).max() <= 2


def test_prompts_of_another_shape_wait_for_a_later_batch(sd15):
    short = resolve_request(sd15.limits, prompt="a red circle", seed=1, **SIZE)
    weighted = resolve_request(sd15.limits, prompt="a (red:1.4) circle", seed=2, **SIZE)  # embeddings
    with_negative = resolve_request(sd15.limits, prompt="a circle", negative_prompt="blue", seed=3, **SIZE)
    jobs = [Job(short), Job(weighted), Job(with_negative)]
    deferred = sd15.generate_batch(jobs)
    assert deferred == [jobs[1], jobs[2]] and jobs[0].future.done() and not jobs[1].future.done()
    assert sd15.generate_batch(deferred) == [jobs[2]]
    assert np.array_equal(pixels(jobs[1].future.result(timeout=120)), pixels(sd15.generate(weighted)))


def test_a_request_whose_prompt_is_refused_fails_alone_and_the_others_run(sd15):
    good = resolve_request(sd15.limits, prompt="a red circle", seed=1, **SIZE)
    too_long = resolve_request(sd15.limits, prompt="circle " * 700, seed=2, **SIZE)
    jobs = [Job(good), Job(too_long), Job(good)]
    sd15.generate_batch(jobs)
    with pytest.raises(InputError, match="tokens long"):
        jobs[1].future.result(timeout=120)
    assert np.array_equal(
        pixels(jobs[0].future.result(timeout=120)), pixels(jobs[2].future.result(timeout=120))
    )


class CancelAfter(CancelFlag):
    """A cancel that arrives after `checks` looks at it (one look per denoising step)."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_a_canceled_request_leaves_the_batch_at_the_next_step_and_the_others_finish(sd15):
    requests = [resolve_request(sd15.limits, prompt="a red circle", seed=seed, **SIZE) for seed in (1, 2, 3)]
    alone = [pixels(sd15.generate(each)) for each in requests]
    jobs = [Job(requests[0]), Job(requests[1], cancel=CancelAfter(checks=3)), Job(requests[2])]
    sd15.generate_batch(jobs)
    with pytest.raises(Cancelled, match="canceled after denoising step 2 of 4"):
        jobs[1].future.result(timeout=120)
    assert jobs[1].finished < jobs[0].finished  # answered when it left, not when the batch ended
    for job, expected in ((jobs[0], alone[0]), (jobs[2], alone[2])):
        assert np.abs(pixels(job.future.result(timeout=120)) - expected).max() <= 2


def test_when_every_request_of_a_batch_is_canceled_the_run_stops(sd15):
    request = resolve_request(
        sd15.limits, prompt="a red circle", seed=1, **{**SIZE, "num_inference_steps": 50}
    )
    jobs = [Job(request, cancel=CancelAfter(checks=2)) for _ in range(2)]
    started = time.perf_counter()
    sd15.generate_batch(jobs)
    assert all(isinstance(job.future.exception(timeout=120), Cancelled) for job in jobs)
    assert time.perf_counter() - started < 10  # 2 steps of 50, not 50


def test_a_batch_that_runs_out_of_memory_is_split_and_every_request_gets_its_images(sd15, monkeypatch):
    """No GPU here: the UNet raises CUDA's own exception for more than two latents at once."""
    real_forward = sd15.pipeline.unet.forward

    def forward(sample, *args, **kwargs):
        if sample.shape[0] > 2 * 2:  # classifier-free guidance doubles the batch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(sd15.pipeline.unet, "forward", forward)
    batcher = Batcher(sd15)
    requests = [resolve_request(sd15.limits, prompt="a red circle", seed=seed, **SIZE) for seed in range(4)]
    with holding(batcher):
        jobs = [batcher.submit(each) for each in requests]
    for job in jobs:
        assert len(job.future.result(timeout=120).images) == 1
    assert {job.batch_size for job in jobs} == {2}  # 4 -> 2 + 2


# -- the queue, with an engine that records what it is asked to run --------------------------------


class RecordingEngine:
    def __init__(self, pixel_budget: int = 4 * 64 * 64, fail_batches: bool = False):
        self.family = SimpleNamespace(pixel_budget=pixel_budget)
        self.batches: list[list[str]] = []
        self.fail_batches = fail_batches

    def generate_batch(self, jobs):
        if self.fail_batches and len(jobs) > 1:
            raise BatchFailed("out of GPU memory for the batch")
        self.batches.append([job.request.prompt for job in jobs])
        for job in jobs:
            job.finish(SimpleNamespace(images=[job.request.prompt]))
        return []


class holding:
    """Keep the generation thread busy while the block submits, so the jobs wait together."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.release = batcher, threading.Event()

    def __enter__(self):
        from sdcog.generate.cancellation import generation_thread

        self.blocker = generation_thread().submit(self.release.wait)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.blocker.result()


def lora(sha: str, scale: float = 1.0) -> FetchedAdapters:
    return FetchedAdapters(loras=(FetchedLora(AdapterFile(None, sha, sha), scale),))


def request_for(prompt: str, size: int = 64, **inputs):
    return resolve_request(LIMITS, prompt=prompt, width=size, height=size, seed=1, **inputs)


def test_compatible_requests_share_a_batch_and_incompatible_ones_wait_in_order():
    engine = RecordingEngine()
    batcher = Batcher(engine)
    with holding(batcher):
        jobs = [
            batcher.submit(request_for("a")),
            batcher.submit(request_for("b", size=128)),
            batcher.submit(request_for("c")),
            batcher.submit(request_for("d"), lora("1")),
            batcher.submit(request_for("e"), lora("2")),
            batcher.submit(request_for("f"), lora("1", scale=0.5)),
            batcher.submit(request_for("g"), lora("1")),
        ]
    for job in jobs:
        job.future.result(timeout=10)
    # Different LoRAs, or one LoRA at different scales, never share a batch.
    assert engine.batches == [["a", "c"], ["b"], ["d", "g"], ["e"], ["f"]]


def test_the_pixel_budget_and_the_batch_limit_bound_a_batch():
    engine = RecordingEngine(pixel_budget=3 * 64 * 64)
    batcher = Batcher(engine, max_batch=8)
    with holding(batcher):
        jobs = [batcher.submit(request_for(str(index))) for index in range(7)]
    [job.future.result(timeout=10) for job in jobs]
    assert [len(batch) for batch in engine.batches] == [3, 3, 1]
    engine.batches.clear()
    batcher = Batcher(RecordingEngine(pixel_budget=100 * 64 * 64), max_batch=2)
    with holding(batcher):
        jobs = [batcher.submit(request_for(str(index))) for index in range(5)]
    [job.future.result(timeout=10) for job in jobs]
    assert [len(batch) for batch in batcher.engine.batches] == [2, 2, 1]


def test_with_batching_off_every_request_runs_alone_in_arrival_order():
    engine = RecordingEngine()
    batcher = Batcher(engine, batching=False)
    with holding(batcher):
        jobs = [batcher.submit(request_for(prompt)) for prompt in "abc"]
    [job.future.result(timeout=10) for job in jobs]
    assert engine.batches == [["a"], ["b"], ["c"]]


def test_a_failed_batch_is_split_until_each_request_runs_alone():
    engine = RecordingEngine(fail_batches=True)
    batcher = Batcher(engine)
    with holding(batcher):
        jobs = [batcher.submit(request_for(prompt)) for prompt in "abcd"]
    assert [job.future.result(timeout=10).images for job in jobs] == [["a"], ["b"], ["c"], ["d"]]
    assert engine.batches == [["a"], ["b"], ["c"], ["d"]]


def test_a_request_canceled_or_timed_out_while_queued_never_runs():
    engine = RecordingEngine()
    now = [0.0]
    batcher = Batcher(engine, queue_timeout=60, clock=lambda: now[0])
    with holding(batcher):
        canceled = batcher.submit(request_for("canceled"))
        canceled.cancel.set()
        old = batcher.submit(request_for("old"))
        now[0] = 61
        fresh = batcher.submit(request_for("fresh", size=128))
    with pytest.raises(Cancelled, match="while waiting in the queue"):
        canceled.future.result(timeout=10)
    with pytest.raises(QueueTimeout, match="SDCOG_QUEUE_TIMEOUT_S=60"):
        old.future.result(timeout=10)
    fresh.future.result(timeout=10)
    assert engine.batches == [["fresh"]]
