"""How often a model draws what the prompt asks for, in the shapes world.

Each scene's caption is the prompt; `sdcog_tools.shapes.judge` reads the image back. An image adheres
when its object has the asked colour and shape; the background is counted separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdcog.generate.batching import Batcher
from sdcog.generate.engine import Engine
from sdcog.generate.generation import Generation
from sdcog.resolve.request import GenerationRequest, resolve_request
from sdcog_tools.shapes import HELD_OUT_SCENES, Scene, judge


@dataclass(frozen=True)
class Adherence:
    images: int
    hits: int
    """Object colour and shape both right."""
    colour_hits: int
    shape_hits: int
    background_hits: int

    @property
    def rate(self) -> float:
        return self.hits / self.images

    def summary(self) -> str:
        def share(count: int) -> str:
            return f"{count / self.images:.1%}"

        return (
            f"prompt adherence {share(self.hits)} of {self.images} images "
            f"(colour {share(self.colour_hits)}, shape {share(self.shape_hits)}, "
            f"background {share(self.background_hits)})"
        )


def generate_all(engine: Engine, requests: list[GenerationRequest]) -> list[Generation]:
    """Each request's Generation, the requests queued together so that they run in batches as the
    server runs them (the same pixels as one by one up to batched rounding; 1.7x faster on 2 CPU
    cores for the bundled model, 8 x 4 images)."""
    batcher = Batcher(engine, max_batch=8)
    jobs = batcher.submit_all([(request, None) for request in requests])  # the same batches every run
    return [job.future.result() for job in jobs]


def measure_adherence(
    model: Engine | Path,
    scenes: Iterable[Scene] = HELD_OUT_SCENES,
    seeds: tuple[int, ...] = (0, 1),
    device: str | None = None,
    **request_options: Any,
) -> Adherence:
    """Generate each scene's caption once per seed (image i of a scene uses seeds[0] + i) and judge it."""
    engine = model if isinstance(model, Engine) else Engine.load(model, torch.device(device or "cpu"))
    scenes = list(scenes)
    requests = [
        resolve_request(
            engine.limits, prompt=scene.caption, seed=seeds[0], num_outputs=len(seeds), **request_options
        )
        for scene in scenes
    ]
    judged = [
        (scene, judge(image))
        for scene, generation in zip(scenes, generate_all(engine, requests), strict=True)
        for image in generation.images
    ]
    return Adherence(
        images=len(judged),
        hits=sum(seen.matches(scene) for scene, seen in judged),
        colour_hits=sum(seen.colour == scene.colour for scene, seen in judged),
        shape_hits=sum(seen.shape == scene.shape for scene, seen in judged),
        background_hits=sum(seen.background == scene.background for scene, seen in judged),
    )
