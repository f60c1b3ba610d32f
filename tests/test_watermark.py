"""The invisible watermark: it decodes back from each output format at the default quality, on a
real 256x256 image of the bundled model (a 4x hires fix); with it off the pixels are exactly the
generated ones; an image too small to carry it says so in its metadata."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from sdcog.generate.engine import Engine
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.request import resolve_request
from sdcog.write import watermark
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext, write_outputs


@pytest.fixture(scope="module")
def engine():
    return Engine.load(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module")
def large(engine):
    """Two 256x256 images of the bundled model (64 px, hires fix 4x) and their request."""
    request = resolve_request(
        engine.limits,
        prompt="a yellow star on a purple background",
        seed=5,
        num_outputs=2,
        num_inference_steps=12,
        hires_scale=4,
        hires_denoising_strength=0.5,
    )
    return request, engine.generate(request)


@pytest.mark.parametrize("output_format", ["png", "jpg", "webp"])
def test_the_watermark_decodes_from_each_format_at_the_default_quality(large, output_format, tmp_path):
    request, generation = large
    request = dataclasses.replace(request, output_format=output_format)  # quality 90, the default
    paths = write_outputs(generation, request, "shapes-sd", tmp_path)
    for path, generated in zip(paths, generation.images, strict=True):
        with Image.open(path) as written:
            assert written.size == (256, 256)
            assert watermark.matching_bits(written) >= watermark.MATCH_BITS, path
        assert parse_infotext_fields(read_infotext(path))["Watermark"] == watermark.LABEL
        assert not watermark.is_watermarked(generated)  # the mark is the file's, not chance


def test_without_the_watermark_the_pixels_are_the_generated_ones(large, tmp_path):
    request, generation = large
    request = dataclasses.replace(request, output_format="png", apply_watermark=False)
    for path, generated in zip(
        write_outputs(generation, request, "shapes-sd", tmp_path), generation.images, strict=True
    ):
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(generated))
        assert "Watermark" not in parse_infotext_fields(read_infotext(path))


def test_an_image_too_small_to_carry_it_says_so(engine, tmp_path):
    request = resolve_request(
        engine.limits, prompt="a red circle", seed=1, num_inference_steps=4, output_format="png"
    )
    generation = engine.generate(request)
    [path] = write_outputs(generation, request, "shapes-sd", tmp_path)
    assert parse_infotext_fields(read_infotext(path))["Watermark"] == (
        "none (64x64 is under the library's 256x256 pixels)"
    )
    with Image.open(path) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(generation.images[0]))
