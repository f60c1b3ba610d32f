"""Output files carry their generation parameters in the format AUTOMATIC1111's PNG Info reads."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sdcog.families import SD1
from sdcog.outputs import (
    OutputDirectory,
    format_infotext,
    generation_infotext,
    parse_infotext_fields,
    read_infotext,
    write_outputs,
)
from sdcog.request import ModelLimits, resolve_request

LIMITS = ModelLimits(family=SD1, native_width=64, native_height=64)


def test_infotext_matches_automatic1111_layout():
    request = resolve_request(
        LIMITS,
        prompt="a red circle",
        negative_prompt="blurry",
        width=64,
        height=64,
        seed=7,
        num_inference_steps=20,
        guidance_scale=7.5,
        scheduler="K_EULER_ANCESTRAL",
    )
    text = generation_infotext(request, seed=8, model_name="tiny")
    assert text.splitlines() == [
        "a red circle",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 8, Size: 64x64, Model: tiny, Mode: txt2img, "
        "Version: sdcog 0.1.0",
    ]


def test_values_with_commas_or_colons_are_quoted_and_parse_back():
    text = format_infotext("p", "", {"Model": "org/model, v2: final", "Seed": 3})
    assert text == 'p\nModel: "org/model, v2: final", Seed: 3'
    assert parse_infotext_fields(text) == {"Model": "org/model, v2: final", "Seed": "3"}


@given(
    values=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_characters=':,\n"\\'), min_size=1)
        .map(str.strip)
        .filter(bool),
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])),
        max_size=5,
    )
)
def test_any_fields_round_trip_through_the_infotext(values):
    text = format_infotext("prompt", "", values)
    assert parse_infotext_fields(text) == {key: value for key, value in values.items()}


@pytest.mark.parametrize("output_format", ["png", "jpg", "webp"])
def test_each_format_embeds_the_parameters_of_its_own_image(tmp_path, output_format):
    request = resolve_request(
        LIMITS,
        prompt="ünïcode prompt, with: punctuation",
        seed=100,
        num_outputs=2,
        output_format=output_format,
    )
    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    paths = write_outputs(images, request, "tiny", tmp_path)
    assert [path.name for path in paths] == [f"out-0.{output_format}", f"out-1.{output_format}"]
    for path, seed in zip(paths, (100, 101), strict=True):
        with Image.open(path) as image:
            assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[output_format]
            assert image.size == (64, 64)
        infotext = read_infotext(path)
        assert infotext.splitlines()[0] == "ünïcode prompt, with: punctuation"
        assert parse_infotext_fields(infotext)["Seed"] == str(seed)


def test_png_parameters_chunk_is_what_automatic1111_reads(tmp_path):
    request = resolve_request(LIMITS, prompt="a cat", seed=5, output_format="png")
    [path] = write_outputs([Image.new("RGB", (64, 64))], request, "tiny", tmp_path)
    with Image.open(path) as image:
        assert "Seed: 5" in image.info["parameters"]


def test_each_prediction_gets_a_fresh_directory_and_the_previous_is_removed(tmp_path):
    outputs = OutputDirectory(tmp_path)
    first = outputs.next()
    (first / "out-0.png").write_bytes(b"x")
    second = outputs.next()
    assert second != first and second.is_dir() and not first.exists()
