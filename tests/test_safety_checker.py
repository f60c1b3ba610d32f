"""The safety checker: on by default where the model ships one, black images in place of flagged
ones (order and count kept), verdicts in the logs and in each file's metadata, and
`disable_safety_checker` to skip it. The tiny SD 1.x pipeline ships a real-architecture checker
whose concept thresholds the tests move to decide what it flags."""

import logging

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

from sdcog.generate.engine import Engine
from sdcog.generate.safety import SafetyVerdict
from sdcog.resolve.request import resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext, write_outputs

FAST = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 3}


@pytest.fixture
def engine(tiny_sd15):
    """A fresh engine per test: the tests change the checker's thresholds."""
    return Engine.load(tiny_sd15)


def generate(engine, **inputs):
    request = resolve_request(engine.limits, **{**FAST, "seed": 5, "num_outputs": 3, **inputs})
    return request, engine.generate(request)


def is_black(image):
    return not np.asarray(image).any()


def set_thresholds(engine, concept_thresholds):
    checker = engine.pipeline.safety_checker
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.as_tensor(concept_thresholds))


def test_nothing_flagged_keeps_every_image_and_records_that_the_checker_passed_it(engine, tmp_path):
    request, generation = generate(engine)
    assert generation.safety == [SafetyVerdict.PASSED] * 3
    assert not any(is_black(image) for image in generation.images)
    paths = write_outputs(generation, request, "tiny", tmp_path)
    assert parse_infotext_fields(read_infotext(paths[0]))["Safety checker"] == "passed"


def test_a_flagged_image_becomes_black_in_its_place_and_is_reported(engine, tmp_path, caplog):
    _, unchecked = generate(engine, disable_safety_checker=True)
    # Score each image against the first concept, and put its threshold between the scores, so
    # exactly the highest-scoring image is flagged (the other concepts never flag).
    checker = engine.pipeline.safety_checker
    features = engine.pipeline.feature_extractor(unchecked.images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(features)[1])
        scores = cosine_distance(embeds, checker.concept_embeds)[:, 0].numpy()
    top, runner_up = np.sort(scores)[::-1][:2]
    thresholds = torch.full((17,), 2.0)
    thresholds[0] = float(top + runner_up) / 2
    set_thresholds(engine, thresholds)

    with caplog.at_level(logging.WARNING, logger="sdcog.generate.engine"):
        request, generation = generate(engine)
    flagged_index = int(np.argmax(scores))
    assert generation.flagged == [index == flagged_index for index in range(3)]
    assert len(generation.images) == 3
    for index, image in enumerate(generation.images):
        if index == flagged_index:
            assert is_black(image) and image.size == (64, 64)
        else:  # the others are the very images the unchecked run made
            assert np.array_equal(np.asarray(image), np.asarray(unchecked.images[index]))
    assert f"image {flagged_index} (seed {5 + flagged_index}) was flagged" in caplog.text
    assert "were flagged" not in caplog.text
    paths = write_outputs(generation, request, "tiny", tmp_path)
    verdicts = [parse_infotext_fields(read_infotext(path))["Safety checker"] for path in paths]
    assert verdicts == [
        (SafetyVerdict.FLAGGED if i == flagged_index else SafetyVerdict.PASSED).label for i in range(3)
    ]


def test_when_every_image_is_flagged_the_log_says_so(engine, caplog):
    set_thresholds(engine, torch.full((17,), -2.0))
    with caplog.at_level(logging.WARNING, logger="sdcog.generate.engine"):
        _, generation = generate(engine, num_outputs=2)
    assert generation.flagged == [True, True]
    assert all(is_black(image) for image in generation.images)
    assert "all 2 image(s) were flagged by the safety checker, so every output is black" in caplog.text


def test_disable_safety_checker_skips_it_and_leaves_the_loaded_pipeline_alone(engine):
    set_thresholds(engine, torch.full((17,), -2.0))
    _, generation = generate(engine, disable_safety_checker=True)
    assert generation.safety == [SafetyVerdict.DISABLED] * 3
    assert not any(is_black(image) for image in generation.images)
    _, checked = generate(engine, num_outputs=1)  # the next request is checked again
    assert checked.flagged == [True]


def test_inpainting_a_flagged_image_does_not_paste_the_kept_pixels_back(engine):
    from PIL import Image

    set_thresholds(engine, torch.full((17,), -2.0))
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    _, generation = generate(engine, image=image, mask=mask, prompt_strength=1.0, num_outputs=1)
    assert generation.flagged == [True] and is_black(generation.images[0])


def test_models_without_a_checker_record_no_verdict(tiny_sdxl):
    engine = Engine.load(tiny_sdxl)
    assert not engine.has_safety_checker
    _, generation = generate(engine, num_outputs=1)
    assert generation.safety is None
    _, generation = generate(engine, num_outputs=1, disable_safety_checker=True)
    assert generation.safety is None
