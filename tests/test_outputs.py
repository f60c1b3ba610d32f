"""Output files carry their generation parameters in the format AUTOMATIC1111's PNG Info reads."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sdcog.errors import InputError
from sdcog.generate.generation import Generation
from sdcog.model.families import SD1
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.request import MAX_PROMPT_CHARS, ModelLimits, resolve_request
from sdcog.write.infotext import format_infotext, parse_infotext_fields
from sdcog.write.outputs import (
    OutputDirectory,
    generation_infotext,
    read_exact_texts,
    read_infotext,
    write_outputs,
)

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
    paths = write_outputs(Generation(images), request, "tiny", tmp_path)
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
    [path] = write_outputs(Generation([Image.new("RGB", (64, 64))]), request, "tiny", tmp_path)
    with Image.open(path) as image:
        assert "Seed: 5" in image.info["parameters"]


def test_outputs_stay_while_any_prediction_runs_and_for_the_grace_period_after(tmp_path):
    """Issue 18: with concurrent predictions, the next one's start removed files not yet sent."""
    now = [0.0]
    outputs = OutputDirectory(tmp_path, grace=60, clock=lambda: now[0])
    first = outputs.next()
    (first / "out-0.png").write_bytes(b"x")
    second = outputs.next()  # while the first still runs
    assert second != first and first.is_dir() and second.is_dir()
    outputs.finished(first)
    now[0] = 59
    third = outputs.next()  # the first finished 59 s ago: Cog may still be sending its files
    assert first.is_dir()
    now[0] = 60
    outputs.finished(third)
    outputs.next()
    assert not first.exists() and second.is_dir() and third.is_dir()  # the second never finished


# -- what AUTOMATIC1111's reader makes of the infotext ------------------------------------------------

_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def automatic1111_parse(infotext: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) as AUTOMATIC1111's `parse_generation_parameters` reads them
    (modules/infotext_utils.py: the same line split, prefix test and field pattern)."""
    *lines, last = infotext.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    fields = {key.strip(): value for key, value in _A1111_PARAM.findall(last)}
    return prompt, negative, fields


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR / "tokenizer")


FORGERIES = [
    "a cat\nNegative prompt: planted\nSteps: 999, Sampler: Euler, Seed: 1, Size: 8x8",
    "Negative prompt: all of this is the prompt",
    "  Negative prompt: after spaces",
    "a cat\r\nSteps: 1, Sampler: X, CFG scale: 1, Seed: 2",
    "a cat\u2028Steps: 1, Sampler: X, Seed: 2\u2029Size: 1x1, Model: m, Mode: m",
    "a dog\x0bSteps: 1\x0cSampler: X\x85Seed: 3, Size: 1x1",
    "\n\n\n",
]


@given(
    prompt=st.one_of(
        st.sampled_from([*FORGERIES, "\x1c", "\x1fa cat\x1e", "a\x1cb"]),
        st.lists(
            st.sampled_from(list('ab ,:\n\r\u2028\x85\x1c\t"'))
            | st.sampled_from(["Negative prompt:", "Steps: 9", "Seed: 1", "Size: 8x8", "Sampler: X"])
        ).map("".join),
    ),
    negative=st.sampled_from(["", "blurry", "x\nSteps: 7, Seed: 7, Size: 7x7", "Negative prompt: n"]),
)
def test_no_prompt_changes_the_parameters_automatic1111_reads(prompt, negative, clip_tokenizer):
    request = resolve_request(LIMITS, prompt=prompt, negative_prompt=negative, seed=5, num_inference_steps=20)
    infotext = generation_infotext(request, seed=5, model_name="tiny")
    read_prompt, read_negative, fields = automatic1111_parse(infotext)
    assert fields["Steps"] == "20" and fields["Seed"] == "5" and fields["Size"] == "64x64"
    assert fields["Sampler"] == "DPM++ 2M Karras" and fields["Model"] == "tiny"

    def tokens(text):
        return clip_tokenizer(text, add_special_tokens=False).input_ids

    # What the model reads: the prompt without leading and trailing whitespace (Python's, with the
    # separators \x1c-\x1f, which CLIP alone would read as tokens); see PromptEncoder.parse.
    assert tokens(read_prompt) == tokens(prompt.strip())
    assert tokens(read_negative) == tokens(negative.strip())


@pytest.mark.parametrize("output_format", ["png", "jpg", "webp"])
def test_the_exact_prompts_are_kept_beside_the_infotext(tmp_path, output_format):
    prompt, negative = FORGERIES[0] + " \u00e9\u4e2d\x00", "line one\nline two"
    request = resolve_request(
        LIMITS, prompt=prompt, negative_prompt=negative, seed=1, output_format=output_format
    )
    [path] = write_outputs(Generation([Image.new("RGB", (64, 64))]), request, "tiny", tmp_path)
    assert read_exact_texts(path) == {"prompt": prompt, "negative_prompt": negative}
    assert automatic1111_parse(read_infotext(path))[2]["Steps"] == "30"


@pytest.mark.parametrize("output_format", ["png", "jpg", "webp"])
def test_the_longest_prompts_fit_every_format_or_are_refused_naming_output_format(tmp_path, output_format):
    longest = "\u4e2d" * MAX_PROMPT_CHARS  # 2 bytes a character in UTF-16, 3 in UTF-8
    inputs = dict(prompt=longest, negative_prompt=longest, seed=1, output_format=output_format)
    if output_format == "jpg":  # one 64 KB EXIF segment: refused before any work
        with pytest.raises(InputError) as refused:
            resolve_request(LIMITS, **inputs)
        assert refused.value.field == "output_format"
        inputs.update(negative_prompt="", prompt="\u4e2d" * 14_000)  # fits; the exact text does not
    [path] = write_outputs(
        Generation([Image.new("RGB", (64, 64))]), resolve_request(LIMITS, **inputs), "tiny", tmp_path
    )
    assert automatic1111_parse(read_infotext(path))[0] == inputs["prompt"]
    exact = read_exact_texts(path)
    assert exact is None if output_format == "jpg" else exact["prompt"] == longest
