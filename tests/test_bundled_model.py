"""The bundled shapes model as an oracle: what random weights cannot show.

The model (models/shapes-sd, trained by script/train-bundled-model) draws one coloured shape on
a coloured background; `sdcog_tools.shapes.judge` reads its images back by fixed rules. Every threshold
below was set from a measured value with a margin, and says which value; the measured figures
are printed at the end of the test run ("shapes oracle").
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdcog.generate.engine import Engine
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.request import resolve_request
from sdcog.resolve.schedulers import SCHEDULER_NAMES
from sdcog_tools.adherence import generate_all, measure_adherence
from sdcog_tools.shapes import (
    COLOURS,
    HELD_OUT_SCENES,
    SHAPES,
    Scene,
    background_and_foreground,
    judge,
    nearest_colours,
    render,
)

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def engine():
    return Engine.load(BUNDLED_MODEL_DIR, torch.device("cpu"))


@pytest.fixture(scope="module")
def default_adherence(engine):
    return measure_adherence(engine, HELD_OUT_SCENES, seeds=SEEDS)


def generate(engine, prompt, seed=0, num_outputs=1, **inputs):
    return engine.generate(
        resolve_request(engine.limits, prompt=prompt, seed=seed, num_outputs=num_outputs, **inputs)
    ).images


def generate_each(engine, requests):
    """Each request's images, the requests run in batches as the server runs them (faster)."""
    resolved = [resolve_request(engine.limits, **{"seed": 0, **inputs}) for inputs in requests]
    return [generation.images for generation in generate_all(engine, resolved)]


def test_held_out_prompts_are_followed(engine, default_adherence, oracle_figures):
    unguided = measure_adherence(engine, HELD_OUT_SCENES, seeds=SEEDS, guidance_scale=1.0)
    oracle_figures["held-out prompts, defaults (DPM++ 2M Karras, 30 steps, CFG 7.5)"] = (
        default_adherence.summary()
    )
    oracle_figures["held-out prompts, guidance off (CFG 1)"] = unguided.summary()
    # Measured: 96.5% (colour 98.6%, shape 97.9%, background 97.9%) of 144 images; without
    # guidance 95.8%: this model follows its prompts without guidance too.
    assert default_adherence.rate >= 0.85, default_adherence.summary()
    assert default_adherence.background_hits / default_adherence.images >= 0.85
    assert unguided.rate >= 0.85, unguided.summary()


NEGATIVE_SCENES = HELD_OUT_SCENES[::3]


def _negative_overlap(engine, guidance_scale, with_negative=True):
    """How many of a scene's attributes (object colour, shape, background) the images show, on
    average, with an empty prompt and the scene's caption as negative prompt."""
    overlap = images = 0
    requests = [
        dict(
            prompt="",
            seed=10,
            num_outputs=4,
            negative_prompt=scene.caption if with_negative else None,
            guidance_scale=guidance_scale,
        )
        for scene in NEGATIVE_SCENES
    ]
    for scene, drawn in zip(NEGATIVE_SCENES, generate_each(engine, requests), strict=True):
        for image in drawn:
            seen = judge(image)
            overlap += (seen.colour == scene.colour) + (seen.shape == scene.shape)
            overlap += seen.background == scene.background
            images += 1
    return overlap / images


@pytest.fixture(scope="module")
def negative_overlaps(engine, oracle_figures):
    overlaps = {
        "none": _negative_overlap(engine, 7.5, with_negative=False),
        3.0: _negative_overlap(engine, 3.0),
        7.5: _negative_overlap(engine, 7.5),
    }
    oracle_figures["attributes of the negative prompt shown (of 3), empty prompt"] = ", ".join(
        f"{value:.2f} {'without it' if key == 'none' else f'at CFG {key}'}" for key, value in overlaps.items()
    )
    return overlaps


def test_a_negative_prompt_steers_away_from_what_it_names(negative_overlaps):
    # Measured: 0.42 without it (unguided samples; chance would be 1/8 + 1/3 + 1/8 = 0.58), 0.25 with it.
    assert negative_overlaps[7.5] <= negative_overlaps["none"] - 0.08


def test_stronger_guidance_steers_further_from_the_negative_prompt(negative_overlaps):
    # Measured: 0.31 at CFG 3, 0.25 at CFG 7.5 (0.42 with guidance off, which ignores it).
    assert negative_overlaps[7.5] <= negative_overlaps[3.0] - 0.03


SCHEDULER_SCENES = (
    Scene("red", "circle", "blue"),
    Scene("yellow", "square", "purple"),
    Scene("white", "triangle", "green"),
)
DIVERGING = {
    # Linear multistep samplers of order 4 leave noise in this small model's images at 30 steps
    # (measured: 2 of 6 shapes right, 0 of 6 colour and shape; the images are blotchy). The
    # single-step and 2nd-order samplers are fine. Expected to fail until the model is smoother.
    "PNDM",
    "KLMS",
}


@pytest.mark.parametrize(
    "scheduler",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="diverges on the bundled model"))
        if name in DIVERGING
        else name
        for name in SCHEDULER_NAMES
    ],
)
def test_every_scheduler_draws_the_prompted_shape(engine, scheduler, oracle_figures):
    shapes = images = 0
    requests = [dict(prompt=scene.caption, num_outputs=2, scheduler=scheduler) for scene in SCHEDULER_SCENES]
    for scene, drawn in zip(SCHEDULER_SCENES, generate_each(engine, requests), strict=True):
        for image in drawn:
            shapes += judge(image).shape == scene.shape
            images += 1
    oracle_figures.setdefault("schedulers (prompted shape drawn, of 6)", {})[scheduler] = shapes
    # Measured: 6 of 6 for most; DPM++ 2M SDE 4, DPM++ 2M Karras and LCM 5; PNDM and KLMS 2.
    assert shapes >= 3


def _object_mask(image):
    return background_and_foreground(image)[1]


def _iou(first, second):
    return (first & second).sum() / max(1, (first | second).sum())


def test_img2img_at_low_strength_keeps_the_layout(engine, oracle_figures):
    rng = random.Random(7)
    low, full = [], []
    sources, prompts = [], []
    for scene in HELD_OUT_SCENES[:8]:
        sources.append(render(scene, rng))
        # the prompt asks for another object colour: the layout is what must stay
        recoloured = next(colour for colour in COLOURS if colour not in (scene.colour, scene.background))
        prompts.append(Scene(recoloured, scene.shape, scene.background).caption)
    for strength, ious in ((0.3, low), (1.0, full)):
        requests = [
            dict(prompt=prompt, image=source, prompt_strength=strength, seed=1)
            for prompt, source in zip(prompts, sources, strict=True)
        ]
        for source, [image] in zip(sources, generate_each(engine, requests), strict=True):
            ious.append(_iou(_object_mask(source), _object_mask(image)))
    oracle_figures["img2img object overlap with the input (IoU)"] = (
        f"{np.mean(low):.2f} at strength 0.3, {np.mean(full):.2f} at 1.0"
    )
    # Measured: 0.82 at strength 0.3, 0.42 at 1.0.
    assert np.mean(low) >= 0.7
    assert np.mean(low) - np.mean(full) >= 0.2


def test_inpainting_fills_the_mask_with_the_prompted_colour(engine, oracle_figures):
    palette = list(COLOURS)
    hits = total = 0
    canvas = Image.new("RGB", (64, 64), COLOURS["blue"])
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    colours = [colour for colour in ("red", "yellow", "green", "white") for _ in SHAPES for _ in range(2)]
    # One image per request (seeds 0 and 1 of each prompt), so that they run in batches.
    requests = [
        dict(prompt=Scene(colour, shape, "blue").caption, seed=seed, image=canvas, mask=mask)
        for colour in ("red", "yellow", "green", "white")
        for shape in SHAPES
        for seed in (0, 1)
    ]
    for colour, [image] in zip(colours, generate_each(engine, requests), strict=True):
        inside = np.asarray(image)[16:48, 16:48]
        named = nearest_colours(inside.reshape(-1, 3))
        repainted = named[named != palette.index("blue")]
        total += 1
        hits += repainted.size > 0 and np.bincount(repainted).argmax() == palette.index(colour)
    oracle_figures["inpainting: masked area takes the prompted colour"] = f"{hits} of {total}"
    # Measured: 17 of 24 (15 of 24 as two images per request; a colour picked at random: 3 of 24).
    assert hits >= 11
