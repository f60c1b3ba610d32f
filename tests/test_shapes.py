"""The procedural world of the (future) bundled model, and the judge that reads images back."""

import random

import pytest
from PIL import Image

from sdcog_tools.shapes import (
    ALL_SCENES,
    COLOURS,
    HELD_OUT_SCENES,
    SHAPES,
    TRAIN_SCENES,
    Scene,
    judge,
    render,
)


def test_held_out_prompts_are_a_fixed_fifth_never_in_training():
    assert set(TRAIN_SCENES).isdisjoint(HELD_OUT_SCENES)
    assert len(TRAIN_SCENES) + len(HELD_OUT_SCENES) == len(ALL_SCENES) == 8 * 7 * 3
    assert 0.1 < len(HELD_OUT_SCENES) / len(ALL_SCENES) < 0.3
    # Each held-out prompt recombines parts the model has seen: its object colour, shape and background.
    for scene in HELD_OUT_SCENES:
        assert any(seen.colour == scene.colour and seen.shape == scene.shape for seen in TRAIN_SCENES)
        assert any(seen.background == scene.background for seen in TRAIN_SCENES)


def test_the_judge_reads_every_rendered_scene_correctly():
    rng = random.Random(0)
    for scene in ALL_SCENES:
        for _ in range(3):
            judgement = judge(render(scene, rng))
            assert judgement.matches(scene) and judgement.background == scene.background, (scene, judgement)


def test_an_empty_image_has_no_object():
    judgement = judge(Image.new("RGB", (64, 64), COLOURS["blue"]))
    assert (judgement.colour, judgement.shape, judgement.background) == (None, None, "blue")


@pytest.mark.parametrize("shape", SHAPES)
def test_captions_name_colour_shape_and_background(shape):
    assert Scene("red", shape, "blue").caption == f"a red {shape} on a blue background"
