"""How well the bundled ControlNet puts the object where its silhouette says, on held-out boxes.

Each case is a training scene's caption and a held-out box (`shapes.box_held_out`): the prompt
asks for the scene; the control image is the silhouette of its shape in that box. An image hits
when the object it draws overlaps the silhouette with an IoU of at least `HIT_IOU`. The same cases
and seeds run without the ControlNet give the base rate (the base model puts its object anywhere).
Everything runs through the serving path: requests resolved from inputs, ControlNets fetched and
loaded as the server does, queued on a Batcher.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdcog.fetch.adapter_cache import AdapterCache, FetchedAdapters
from sdcog.fetch.control_maps import ControlMaps
from sdcog.generate.batching import Batcher
from sdcog.generate.controlnets import ControlNets
from sdcog.generate.engine import Engine
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.control import BUNDLED_CONTROLNET, ControlSlot
from sdcog.resolve.request import resolve_request
from sdcog_tools.shapes import SHAPES, TRAIN_SCENES, Box, Scene, box_held_out, overlap, random_box, silhouette

HIT_IOU = 0.5
ORACLE_STEPS = 20


@dataclass(frozen=True)
class ControlCase:
    scene: Scene
    box: Box

    @property
    def silhouette(self) -> Image.Image:
        return silhouette(self.scene.shape, self.box)


def held_out_cases(count: int = 24, seed: int = 1) -> list[ControlCase]:
    """`count` cases on held-out boxes, the three shapes in turn."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        box = random_box(rng)
        if not box_held_out(box):
            continue
        shape = SHAPES[len(cases) % len(SHAPES)]
        scene = rng.choice([scene for scene in TRAIN_SCENES if scene.shape == shape])
        cases.append(ControlCase(scene, box))
    return cases


@dataclass(frozen=True)
class ControlMeasure:
    ious: list[float]
    images: list[Image.Image]

    @property
    def hits(self) -> int:
        return sum(iou >= HIT_IOU for iou in self.ious)

    @property
    def mean_iou(self) -> float:
        return sum(self.ious) / len(self.ious)

    def summary(self) -> str:
        return f"{self.hits}/{len(self.ious)} hits (IoU >= {HIT_IOU}), mean IoU {self.mean_iou:.2f}"


class ControlOracle:
    """The bundled model and ControlNet, loaded once, measured under several settings."""

    def __init__(
        self, model: Path = BUNDLED_MODEL_DIR, controlnet: Path | None = None, cache: Path | None = None
    ):
        self.engine = Engine.load(model, torch.device("cpu"))
        options = {} if controlnet is None else {"bundled": Path(controlnet)}
        cache_dir = cache or Path.home() / ".cache" / "sdcog" / "oracle-controlnets"
        self.controlnets = ControlNets(
            self.engine.pipeline.unet,
            torch.float32,
            torch.device("cpu"),
            AdapterCache(cache_dir, 10**9, 10**9),
            **options,
        )
        self.maps = ControlMaps()
        self.batcher = Batcher(self.engine, max_batch=8)

    def measure(
        self, cases: list[ControlCase], controlled: bool = True, seed: int = 0, **slot: Any
    ) -> ControlMeasure:
        """Each case once (seed + case index), with the ControlNet (`slot`: its scale, start, end)
        or without."""
        queued = []
        for index, case in enumerate(cases):
            controls = [ControlSlot(BUNDLED_CONTROLNET, case.silhouette, **slot)] if controlled else []
            request = resolve_request(
                self.engine.limits,
                prompt=case.scene.caption,
                seed=seed + index,
                num_inference_steps=ORACLE_STEPS,
                controlnets=controls,
            )
            request = self.maps.prepare(request)
            queued.append((request, FetchedAdapters(controlnets=self.controlnets.fetch_for(request))))
        jobs = self.batcher.submit_all(queued)  # the same batches on every run
        images = [job.future.result().images[0] for job in jobs]
        return ControlMeasure(
            [overlap(image, case.silhouette) for image, case in zip(images, cases, strict=True)], images
        )


def measure_control(model: Path, controlnet: Path, count: int = 24) -> ControlMeasure:
    """The ControlNet's hits on `count` held-out cases, against the base model's (for the model card)."""
    oracle = ControlOracle(model, controlnet)
    cases = held_out_cases(count)
    without = oracle.measure(cases, controlled=False)
    with_control = oracle.measure(cases)
    return _Compared(with_control, without)


@dataclass(frozen=True)
class _Compared:
    controlled: ControlMeasure
    uncontrolled: ControlMeasure

    def summary(self) -> str:
        return (
            f"on {len(self.controlled.ious)} held-out boxes, with the ControlNet "
            f"{self.controlled.summary()}; "
            f"the same prompts and seeds without it {self.uncontrolled.summary()}"
        )
