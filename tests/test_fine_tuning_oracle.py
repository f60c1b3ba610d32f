"""The fine-tuning oracle (issue 19): `cog train`'s trainer teaches the bundled model a shape it
never saw (a bar, `shapes.NEW_SHAPE`) from a dozen captioned pictures under the trigger word TOK,
and the trained tar, given as `lora_weights`, makes the model draw it for held-out prompts.

Measured on held-out colour pairs (24 prompts each), 2 CPU cores, the settings below
(2026-11-29; thresholds keep a margin of 4 or more):
- `a <colour> TOK on a <background> background`: bars in 0 of 24 before training, 16 of 24 with
  the tar (14 after 400 steps; 8-19 in other runs of the trainer's 2 tokens and learning rates
  around these: this is the one the test pins, seed 0);
- prompts without TOK: with the LoRA at scale 0, the same pixels as the base model; at scale 1,
  the asked shape in 17 of 24 (20 after 400 steps; the base model: 23): the LoRA turns some
  squares, the nearest shape, into bars, which the bound below allows.
Training takes about 35 s here (through the server in training mode); the 120 images about 25 s.
"""

from __future__ import annotations

import base64
import io
import random
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from hostile_archives import data_uri

from sdcog.fetch.adapter_cache import AdapterCache, FetchedAdapters
from sdcog.generate.batching import Job
from sdcog.generate.engine import Engine
from sdcog.model.weights import BUNDLED_MODEL_DIR, PROJECT_ROOT
from sdcog.resolve.request import resolve_request
from sdcog.train.trainer import TrainingInputs
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server
from sdcog_tools.shapes import COLOURS, NEW_SHAPE, SHAPES, Scene, judge, render

SETTINGS = TrainingInputs(
    max_train_steps=600,
    learning_rate=3e-3,
    ti_learning_rate=1e-2,
    lora_rank=8,
    train_batch_size=4,
    seed=0,
)
TRAINING_IMAGES = 12
HELD_OUT = 24
BATCH = 8


@dataclass(frozen=True)
class Pairs:
    training: list[tuple[str, str]]
    held_out: list[tuple[str, str]]


def colour_pairs() -> Pairs:
    pairs = [(colour, background) for colour in COLOURS for background in COLOURS if colour != background]
    random.Random(0).shuffle(pairs)
    return Pairs(pairs[:TRAINING_IMAGES], pairs[TRAINING_IMAGES : TRAINING_IMAGES + HELD_OUT])


def training_archive(path, pairs: list[tuple[str, str]]):
    """A zip of bars, each with its caption in a .txt beside it, as a user would send."""
    rng = random.Random(1)
    with zipfile.ZipFile(path, "w") as archive:
        for index, (colour, background) in enumerate(pairs):
            picture = io.BytesIO()
            render(Scene(colour, NEW_SHAPE, background), rng).save(picture, "PNG")
            archive.writestr(f"{index}.png", picture.getvalue())
            archive.writestr(f"{index}.txt", f"a {colour} TOK on a {background} background")
    return path


@pytest.fixture(scope="module")
def engine():
    return Engine.load(BUNDLED_MODEL_DIR, torch.device("cpu"))


@pytest.fixture(scope="module")
def tar(tmp_path_factory) -> bytes:
    """Trained as `cog train` trains: through the server in training mode, in its own process.
    (In this process, where earlier tests ran generations on another thread, the same training
    took 3.5x as long on 2 cores: two threads' OpenMP teams then compete.)"""
    folder = tmp_path_factory.mktemp("fine-tuning")
    archive = training_archive(folder / "bars.zip", colour_pairs().training)
    inputs = {name: value for name, value in asdict(SETTINGS).items() if value is not None}
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {"MODEL_WEIGHTS": str(BUNDLED_MODEL_DIR)}
    with running_server(PROJECT_ROOT, "train.py:train", env=env, train=True) as server:
        response = server.train({**inputs, "input_images": data_uri(archive.read_bytes())})
    body = response.json()
    assert body.get("status") == "succeeded", body.get("error") or body
    return base64.b64decode(body["output"]["weights"].partition(",")[2])


def draw(engine: Engine, cache: AdapterCache, prompts: list[str], **inputs) -> list:
    """One image per prompt (seed = its index), in batches of 8 (the same batches for every call,
    so that images compare exactly: batched arithmetic rounds by the batch's make-up)."""
    jobs = []
    for index, prompt in enumerate(prompts):
        request = resolve_request(engine.limits, prompt=prompt, seed=index, **inputs)
        jobs.append(Job(request, cache.fetch_for(request) if request.loras else FetchedAdapters()))
    for start in range(0, len(jobs), BATCH):
        pending = jobs[start : start + BATCH]
        while pending:
            pending = engine.generate_batch(pending)
    return [job.future.result().images[0] for job in jobs]


@pytest.fixture(scope="module")
def measured(engine, tar, tmp_path_factory, oracle_figures):
    cache = AdapterCache(tmp_path_factory.mktemp("adapters"), max_bytes=10**9, max_file_bytes=10**8)
    lora = data_uri(tar)
    held_out = colour_pairs().held_out
    with_word = [f"a {colour} TOK on a {background} background" for colour, background in held_out]
    shapes = [SHAPES[index % len(SHAPES)] for index in range(HELD_OUT)]
    without = [f"a {c} {shape} on a {b} background" for (c, b), shape in zip(held_out, shapes, strict=True)]
    judged = {
        "before": draw(engine, cache, with_word),
        "after": draw(engine, cache, with_word, lora_weights=lora),
        "base": draw(engine, cache, without),
        "scale 0": draw(engine, cache, without, lora_weights=lora, lora_scales="0"),
        "scale 1": draw(engine, cache, without, lora_weights=lora),
    }
    every = (*SHAPES, NEW_SHAPE)
    figures = {
        "bars before": sum(judge(image, shapes=every).shape == NEW_SHAPE for image in judged["before"]),
        "bars after": sum(judge(image, shapes=every).shape == NEW_SHAPE for image in judged["after"]),
        **{
            f"asked shape, {name}": sum(
                judge(image).shape == shape for image, shape in zip(judged[name], shapes, strict=True)
            )
            for name in ("base", "scale 0", "scale 1")
        },
    }
    oracle_figures["fine-tuning (a bar under TOK, of 24 held-out prompts)"] = ", ".join(
        f"{name}: {count}" for name, count in figures.items()
    )
    return judged, figures


def test_the_trained_tar_teaches_the_bundled_model_a_shape_it_never_drew(measured):
    _, figures = measured
    assert figures["bars before"] <= 3
    assert figures["bars after"] >= 12


def test_the_lora_does_not_leak_into_prompts_without_the_trigger_word(measured):
    judged, figures = measured
    for image, base in zip(judged["scale 0"], judged["base"], strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(base))
    assert figures["asked shape, base"] >= 20
    assert figures["asked shape, scale 1"] >= 12
