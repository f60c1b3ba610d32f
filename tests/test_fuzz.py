"""Fuzzing Cog's real HTTP server on 127.0.0.1 with over 1,000 generated inputs, valid and invalid.

Two generators drive POST /predictions, one request at a time (the server runs one prediction at a
time, so a second concurrent one would get 409):
- schemathesis, from the OpenAPI document the server itself serves at GET /openapi.json (checked
  first to hold the `paths` that `cog build` writes): positive cases (what the schema allows) and
  negative cases (what it forbids, down to bodies that are not JSON objects);
- hypothesis strategies built from that document's Input properties: valid inputs, which must
  succeed; valid inputs with one or two fields made invalid, whose refusal must name one of those
  fields; and a free mix of omitted, valid, invalid and context-dependent values of every field.

Then two phases of hostile inputs, one family per defect class found by trying the server as a
hostile user would (issue 16): `hostile_inputs` (deeply nested and very long weighted prompts,
compressed, nested and many-member archives in lora_weights and embeddings, image container
formats, header bombs, structure floods and bit depths, a seed past 2^32-1, schedulers at their
step limits), each answered within HOSTILE_LIMIT_S; and prediction ids of every kind sent through
deploy/front.py, the sample deployment's front, which admits the documented id rule and refuses
the rest with 422 naming `id` (sent to the bare server, a hostile id wedges it:
tests/test_stuck_slot.py). At the end the server gives the same output for the same request as at
the start, and the adapter cache holds nothing.

Each request waits for /health-check to say READY first (see `Fuzzer.wait_until_ready`). Every
answer must be: no 5xx, no 409 (requests are sequential: busy means a leaked slot), within
REQUEST_TIMEOUT_S (else it hung), and every refusal names a field: a 422's `detail[].loc` is
["body", "input", <field>]; a failed prediction's `error`, once Cog's wrapping ("Prediction failed:
Async prediction failed: InputError: ") is taken off, starts with "<field>: " (or "width/height/num_outputs:
" for the pixel budget); a 400 (JSON Cog cannot parse) names "input.<field>" in its text, unless
the body was not a JSON object at all. At the end /health-check says READY and the server process
is alive. Problems are collected rather than raised, so one run reports all of them with the exact
bodies; the counts are printed and added to pytest's terminal summary.

Bodies are made cheap before they are sent (see `cheapen`): a valid request may ask for 2048x2048
pixels and 500 steps, which costs CPU time, not validation. The server runs the tiny random-weight
SD 1.x pipeline (conftest's `tiny_sd15`) with one torch thread.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hostile_archives import hostile_archives
from hostile_ids import HOSTILE_IDS, NON_STRING_IDS, VALID_IDS
from hostile_images import (
    CLAIMING,
    FLOODS,
    REFUSED_FORMATS,
    animated,
    float_tiff,
    grey16_mask_png,
    grey16_png,
    ico_bomb,
    int32_tiff,
    lab_tiff,
    mpo_file,
)
from hostile_prompts import HOSTILE_PROMPTS
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from sdcog.model.families import SD1
from sdcog.model.weights import PROJECT_ROOT
from sdcog.resolve.request import OUTPAINT_FIELDS, SEED_MAX
from sdcog_tools.cog_schema import input_properties, write_schema
from sdcog_tools.cog_server import READY, running_server

REQUEST_TIMEOUT_S = 60
"""A cheap request answers in well under a second on 2 idle cores (a few seconds on a loaded
machine); one that takes longer than this is a hang."""

# Generated requests per phase, 1,050 in all; the invalid phase also sends the 65 curated inputs of
# `curated_invalid_inputs` (hypothesis explicit examples).
SCHEMATHESIS_POSITIVE = 250
SCHEMATHESIS_NEGATIVE = 250
HYPOTHESIS_VALID = 120
HYPOTHESIS_INVALID = 250
HYPOTHESIS_MIXED = 180
MIN_REQUESTS = 1000
HOSTILE_ID_EXAMPLES = 60
"""Generated ids sent through the front, besides every known hostile one (tests/hostile_ids.py)."""

SIZE_FIELDS = ("width", "height")
STEPS = "num_inference_steps"
IMAGE, MASK = "image", "mask"
FILE_FIELDS = (IMAGE, MASK)
STRENGTH = "prompt_strength"
NUM_OUTPUTS = "num_outputs"
ENVELOPE_FIELDS = ("id", "input", "webhook", "webhook_events_filter", "output_file_prefix")
BODY = "<body>"
"""What a refusal names when the body was not a JSON object: there is no field to name."""

# -- the cost caps ---------------------------------------------------------------------------------

CHEAP_STEPS_WHEN_OMITTED = 2
LOOPBACK_CLOSED_PORT = "127.0.0.1:1"


def _in_range(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def cheapen(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same request, cheap to run on a CPU. Only values the schema allows and that cost time
    are changed, keeping the class of every value, so each rule is still exercised; invalid values
    are sent as they are:
    - width/height: an integer in 64..2048 becomes one in 64..79 with the same remainder mod 8 (a
      multiple of 8 stays one, a non-multiple stays one), unless width x height x num_outputs as
      sent is over the pixel budget (kept then: that refusal comes before any work);
    - num_inference_steps: an integer in 1..500 becomes 1..3; omitted, it is set to 2 (the default,
      30 steps at the tiny model's native 128x128, costs ~0.7 s a request);
    - outpaint_*: an integer in 1..1024 becomes 1..16 (0 stays 0), unless left+right or top+bottom
      is over 1984 (the canvas is then over 2048 pixels whatever the image: refused before work);
    - image/mask, and each URL of lora_weights and embeddings: an http(s) URL gets host 127.0.0.1
      port 1, so the server never fetches from the network (it refuses loopback hosts, naming the
      field; with SDCOG_ALLOW_LOCAL_URLS=1 the connection is refused, naming the field too).
    num_outputs (1..4) is kept: at these sizes a batch of 4 costs little more than 1.
    """
    cheap = dict(inputs)
    sizes = [cheap.get(name) for name in SIZE_FIELDS]
    count = cheap.get(NUM_OUTPUTS, 1)
    over_budget = (
        all(_in_range(size, 64, 2048) for size in sizes)
        and _in_range(count, 1, 4)
        and sizes[0] * sizes[1] * count > SD1.pixel_budget
    )
    if not over_budget:
        for name in SIZE_FIELDS:
            value = cheap.get(name)
            if _in_range(value, 64, 2048):
                cheap[name] = 64 + value % 8 + 8 * ((value // 8) % 2)
    steps = cheap.get(STEPS)
    if STEPS not in cheap:
        cheap[STEPS] = CHEAP_STEPS_WHEN_OMITTED
    elif _in_range(steps, 1, 500):
        cheap[STEPS] = 1 + (steps - 1) % 3
    left, top, right, bottom = (cheap.get(name, 0) for name in OUTPAINT_FIELDS)
    pairs_fit = all(
        not (_in_range(a, 0, 1024) and _in_range(b, 0, 1024) and a + b > 1984)
        for a, b in ((left, right), (top, bottom))
    )
    if pairs_fit:
        for name in OUTPAINT_FIELDS:
            value = cheap.get(name)
            if _in_range(value, 1, 1024):
                cheap[name] = 1 + (value - 1) % 16
    for name in FILE_FIELDS:
        if isinstance(cheap.get(name), str):
            cheap[name] = _offline_url(cheap[name])
    for name in (
        LORA_WEIGHTS,
        EMBEDDINGS,
        REPLICATE_WEIGHTS,
    ):  # each reference offline; hub ids: fuzz_server's env
        if isinstance(cheap.get(name), str):
            references = cheap[name].replace(",", " ").split()
            cheap[name] = " ".join(_offline_reference(item) for item in references) or cheap[name]
    return cheap


def _offline_reference(item: str) -> str:
    """An adapter reference, or an embedding's `word=reference`, pointed away from the network."""
    word, equals, reference = item.partition("=")
    if equals and "://" not in word:
        return f"{word}={_offline_url(reference)}"
    return _offline_url(item)


def _offline_url(value: str) -> str:
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return value  # the server cannot parse it either, so it fetches nothing
    if parts.scheme.lower() not in ("http", "https") or parts.hostname in (None, "127.0.0.1"):
        return value
    return urllib.parse.urlunsplit((parts.scheme, LOOPBACK_CLOSED_PORT, parts.path, "", ""))


# -- images ----------------------------------------------------------------------------------------


def _data_uri(image: Image.Image, image_format: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@functools.cache
def image_uri(width: int, height: int, mode: str = "RGB", image_format: str = "PNG") -> str:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, 0 * x + y, np.full((height, width), 90.0)], axis=2).astype(np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    if image_format == "JPEG" and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return _data_uri(image, image_format)


@functools.cache
def mask_uri(width: int, height: int, white: str = "right") -> str:
    """An "L" mask: white on one half ("left", "right", "top", "bottom"), everywhere, or nowhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    if white == "right":
        mask[:, width // 2 :] = 255
    elif white == "left":
        mask[:, : width // 2 + 1] = 255
    elif white == "top":
        mask[: height // 2 + 1] = 255
    elif white == "bottom":
        mask[height // 2 :] = 255
    elif white == "all":
        mask[:] = 255
    return _data_uri(Image.fromarray(mask), "PNG")


@functools.cache
def oversized_image_uri() -> str:
    """A small file whose header claims 8000x7000 pixels (56 megapixels): refused before decoding."""
    return _data_uri(Image.new("1", (8000, 7000), 0), "PNG")


# -- strategies ------------------------------------------------------------------------------------

FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_LEAVES = st.none() | st.booleans() | st.integers() | FINITE_FLOATS | st.text()
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
HUGE_TEXT = st.builds(
    lambda char, count: char * count,
    st.sampled_from(["x", "é", "🙂", "\u202e", "\x00", " "]),
    st.integers(1000, 20000),
)
TEXT = st.text(max_size=120) | HUGE_TEXT | st.sampled_from(["", " ", "\x00", "🙂" * 80, "a" * 77 + "🙂"])
PROMPTS = (
    st.text(max_size=120)
    | st.sampled_from(["", " ", "\x00", "🙂" * 80, "a" * 77 + "🙂", " " * 5000, "(a (red:1.3) [[circle]]"])
    | st.builds(lambda count: "a red circle on a blue background, " * count, st.integers(5, 40))
)
"""Valid prompts: up to 600 tokens (long ones are encoded in 75-token windows), weighted or not."""
TOO_LONG_PROMPT = "a red circle on a blue background " * 150
PROMPT_FIELDS = ("prompt", "negative_prompt")
LORA_WEIGHTS, LORA_SCALES, EMBEDDINGS = "lora_weights", "lora_scales", "embeddings"
REPLICATE_WEIGHTS = "replicate_weights"
"""One reference (a trained tar), not a list: valid offline only when blank."""
NO_LORAS = st.sampled_from(["", " ", ",", " , \n"])
"""The only valid LoRA (or embedding) inputs offline: none (real ones are tested in tests/test_loras.py
and tests/test_embeddings.py)."""
BAD_LORA_REFERENCES = st.sampled_from(
    [
        "a-lora",
        "owner/model",  # Replicate: fuzz_server points its endpoint at 127.0.0.1:1 (refused)
        "huggingface.co/owner/repo",  # the same for Hugging Face
        "https://10.0.0.1/x.safetensors",
        f"https://{LOOPBACK_CLOSED_PORT}/x.safetensors",
        "http://example.com/x.safetensors",
        "ftp://example.com/x.safetensors",
        "data:,hello",
        "data:;base64,AAAAAAAAAAA=",
        "a/b c/d e/f g/h i/j",
    ]
) | st.text(max_size=20).filter(lambda text: text.replace(",", " ").split())
BAD_EMBEDDINGS = BAD_LORA_REFERENCES | st.sampled_from(
    [
        "word=a-lora",
        "(word)=owner/model",
        "a=owner/x A=owner/y",
        f"w=https://{LOOPBACK_CLOSED_PORT}/x.safetensors",
        "w=data:;base64,AAAAAAAAAAA=",
        " ".join(f"w{index}=owner/x" for index in range(9)),
    ]
)
CONTROLNET_MODELS = ("controlnet_1", "controlnet_2", "controlnet_3")
CONTROLNET_IMAGES = tuple(f"{name}_image" for name in CONTROLNET_MODELS)
NO_CONTROLNETS = st.sampled_from(["", " ", "none"])
"""The only valid ControlNet inputs without a control image (real ones: tests/test_controlnets.py and
tests/test_controlnet_http.py)."""
BAD_CONTROLNETS = st.sampled_from(["cany", "shapes silhouette", "a-controlnet", "ftp:x"])
"""Neither a name nor a reference: refused naming the slot before anything else is read."""
LONE_SURROGATE = st.builds(
    lambda text, char: text + char, st.text(max_size=10), st.sampled_from(["\ud800", "\udfff"])
)
"""Sent as a JSON "\\ud800" escape: valid JSON syntax, but no Unicode character."""

VALID_SIDE = st.sampled_from([64, 72, 80, 88, 96])
IMAGE_MODES = st.sampled_from(["RGB", "RGBA", "L", "P"])
IMAGE_FORMATS = st.sampled_from(["PNG", "JPEG", "WEBP"])


def square_image(side: st.SearchStrategy[int] = st.integers(64, 80)) -> st.SearchStrategy[str]:
    """A square image: with width or height given, the other side follows its (1:1) aspect ratio."""
    return st.builds(lambda s, mode, fmt: image_uri(s, s, mode, fmt), side, IMAGE_MODES, IMAGE_FORMATS)


VALID_MASK = st.builds(
    mask_uri,
    st.integers(16, 96),
    st.integers(16, 96),
    st.sampled_from(["left", "right", "top", "bottom", "all"]),
)
NOT_IMAGES = [
    "",
    "hello",
    "/etc/passwd",
    "./predict.py",
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
    "gopher://127.0.0.1/x",
    f"http://{LOOPBACK_CLOSED_PORT}/x.png",
    f"https://{LOOPBACK_CLOSED_PORT}/x.png",
    "https://[::1]:1/x.png",
    "https://10.0.0.1:1/x.png",
    "https://169.254.169.254/latest/meta-data",
    "https://[abc/x.png",
    "https://\u2603.invalid/x.png",
    "https://a..b.invalid/x.png",
    "https://:1/x.png",
    "data:",
    "data:image/png;base64",
    "data:image/png;base64,",
    "data:image/png;base64,!!!",
    "data:image/png;base64,iVBORw0KGgo",
    "data:text/plain;base64,aGVsbG8=",
    "data:,hello",
    "data:image/png,%ZZ",
    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(),
]
"""File inputs that are no image, none on the network: each must be refused naming its field."""
NOT_AN_IMAGE = st.sampled_from(NOT_IMAGES) | st.text(max_size=40)


@functools.cache
def truncated_png_uri() -> str:
    head, payload = image_uri(64, 64).split(",", 1)
    data = base64.b64decode(payload)
    return head + "," + base64.b64encode(data[: len(data) // 2]).decode()


def wrong_types(json_type: str) -> st.SearchStrategy[Any]:
    """JSON values of another type than `json_type` (null included)."""
    others = {
        "integer": st.text(max_size=8) | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({}),
        "number": st.text(max_size=8) | st.booleans() | st.lists(FINITE_FLOATS, max_size=2),
        "string": st.integers()
        | FINITE_FLOATS
        | st.booleans()
        | st.lists(st.text(max_size=5), max_size=2)
        | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
        "boolean": st.sampled_from([0, 1, "true", "false", "yes", "", [True], {}]),
    }[json_type]
    return st.none() | others


def invalid_value(name: str, prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of `name` that are wrong whatever the other inputs are: the refusal must name it."""
    json_type = prop["type"]
    options = [wrong_types(json_type)]
    low, high = prop.get("minimum"), prop.get("maximum")
    if "enum" in prop:
        choices = prop["enum"]
        options.append(st.text(max_size=30).filter(lambda value: value not in choices))
        options.append(
            st.sampled_from(choices).map(
                lambda value: value.lower() if value != value.lower() else value.upper()
            )
        )
        options.append(st.sampled_from(choices).map(lambda value: f" {value}"))
        options.append(HUGE_TEXT)
    elif json_type == "integer":
        options.append(st.integers(max_value=low - 1) if low is not None else st.nothing())
        options.append(st.integers(min_value=high + 1) if high is not None else st.nothing())
        options.append(st.sampled_from([2**63, 2**64 + 1, -(2**63) - 1, 10**30]))
        # 64.0 passes the schema's "integer" (JSON Schema counts it as one); our rules refuse it.
        options.append(st.integers(low or 0, high or 100).map(float))
        options.append(st.floats(low or 0, high or 100).filter(lambda value: not value.is_integer()))
        if name in SIZE_FIELDS:
            options.append(st.integers(low, high).filter(lambda value: value % 8))
    elif json_type == "number":
        below = st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False)
        above = st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False)
        options.append(below if low is not None else st.nothing())
        options.append(above if high is not None else st.nothing())
        options.append(st.sampled_from([1e308, -1e308, 10**30]))
    elif json_type == "string" and prop.get("format") == "uri":
        options.append(NOT_AN_IMAGE)
        options.append(st.builds(truncated_png_uri))
        if name == IMAGE:
            options.append(st.builds(oversized_image_uri))
        if name == MASK:
            options.append(st.builds(mask_uri, st.integers(8, 96), st.integers(8, 96), st.just("none")))
    elif json_type == "string":
        options.append(LONE_SURROGATE)
    if name in PROMPT_FIELDS:
        options.append(st.just(TOO_LONG_PROMPT))
    if name in (LORA_WEIGHTS, REPLICATE_WEIGHTS):
        options.append(BAD_LORA_REFERENCES)
    if name == EMBEDDINGS:
        options.append(BAD_EMBEDDINGS)
    if name in CONTROLNET_MODELS:
        options.append(BAD_CONTROLNETS)
    if name == LORA_SCALES:  # refused when lora_weights names no LoRA, as in a valid input
        options.append(st.sampled_from(["1", "strong", "9", "-5", "1, 2, 3, 4, 5", "nan"]))
    return st.one_of(options)


def valid_value(name: str, prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Cheap values of `name` valid in any mode (files, steps, strength and outpainting aside)."""
    if name in SIZE_FIELDS:
        return VALID_SIDE
    if name in CONTROLNET_MODELS:
        return NO_CONTROLNETS
    if name == "sizing_strategy":  # the others need an input or a control image
        return st.sampled_from(["auto", "width_height"])
    if name == "return_control_maps":  # refused without a ControlNet
        return st.just(False)
    if name == "clip_skip":  # the tiny models' text encoders have 2 layers
        return st.integers(1, 2)
    if name == "hires_scale":  # a hires fix is for text-to-image only: valid_inputs adds it there
        return st.just(1.0)
    if name == "hires_steps":
        return st.integers(0, 3)
    if name == "refine":  # no refiner is loaded on the fuzzed model
        return st.just("no_refiner")
    if name == "canny_low_threshold":  # at most the high threshold
        return st.integers(1, 128)
    if name == "canny_high_threshold":
        return st.integers(128, 255)
    if "enum" in prop:
        return st.sampled_from(prop["enum"])
    json_type = prop["type"]
    if json_type == "integer":
        return st.integers(prop.get("minimum"), prop.get("maximum"))
    if json_type == "number":
        return st.floats(prop.get("minimum"), prop.get("maximum"))
    if json_type == "boolean":
        return st.booleans()
    if name in PROMPT_FIELDS:
        return PROMPTS
    if name in (LORA_WEIGHTS, LORA_SCALES, EMBEDDINGS):
        return NO_LORAS
    if name == REPLICATE_WEIGHTS:
        return st.sampled_from(["", " "])
    if json_type == "string":
        return TEXT
    raise AssertionError(f"no valid-value strategy for {name}: {prop}")


UNKNOWN_KEYS = st.dictionaries(st.text(min_size=1, max_size=12), ANY_JSON, max_size=2)


@st.composite
def valid_inputs(draw, properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A valid, cheap input: txt2img, img2img, inpainting or outpainting, optional fields omitted
    at random, now and then with unknown fields (which Cog drops)."""
    special = {STEPS, STRENGTH, *FILE_FIELDS, *OUTPAINT_FIELDS, *CONTROLNET_IMAGES}
    optional = {name: valid_value(name, prop) for name, prop in properties.items() if name not in special}
    inputs = draw(st.fixed_dictionaries({}, optional=optional))
    steps = inputs[STEPS] = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["txt2img", "img2img", "inpaint", "outpaint"]))
    if mode == "txt2img":
        if draw(st.booleans()):
            inputs[STRENGTH] = draw(st.floats(0, 1))
        if draw(st.integers(0, 5)) == 0:  # now and then a cheap hires fix (1 repaint step or more)
            inputs.update(hires_scale=1.5, hires_denoising_strength=1.0)
    else:
        inputs[IMAGE] = draw(square_image())
        # int(steps x prompt_strength) denoising steps run, and must be at least 1.
        inputs[STRENGTH] = draw(st.floats(min(1.0, 1 / steps + 1e-9), 1))
    seed, count = inputs.get("seed"), inputs.get(NUM_OUTPUTS, 1)
    if isinstance(seed, int) and seed + count - 1 > SEED_MAX:  # the last image's seed must be one too
        inputs["seed"] = seed - (count - 1)
    if mode == "inpaint" or (mode == "outpaint" and draw(st.booleans())):
        inputs[MASK] = draw(VALID_MASK)
    if mode == "outpaint":
        amounts = draw(st.lists(st.integers(0, 16), min_size=4, max_size=4).filter(any))
        inputs.update(dict(zip(OUTPAINT_FIELDS, amounts, strict=True)))
    if draw(st.integers(0, 9)) == 0:
        inputs.update(
            draw(UNKNOWN_KEYS.map(lambda extra: {k: v for k, v in extra.items() if k not in properties}))
        )
    return inputs


@st.composite
def invalid_inputs(draw, properties: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """A valid input with one or two fields made invalid; returns it and the fields changed."""
    inputs = draw(valid_inputs(properties))
    broken = draw(st.lists(st.sampled_from(sorted(properties)), min_size=1, max_size=2, unique=True))
    for name in broken:
        inputs[name] = draw(invalid_value(name, properties[name]))
    return inputs, set(broken)


def mixed_value(name: str, prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Any value of `name`: invalid one time in 8, else full-range valid or valid depending on the
    others (sizes, images, outpainting, strength), so that most bodies reach our own rules."""
    invalid = invalid_value(name, prop)
    options = []
    low, high = prop.get("minimum"), prop.get("maximum")
    if prop["type"] == "integer" and "enum" not in prop:
        options.append(st.integers(low, high))
        if name in SIZE_FIELDS:
            options.append(st.sampled_from([2048, 2040, 1536, 1024]))
    elif prop["type"] == "string" and prop.get("format") == "uri":
        options.append(square_image(st.integers(1, 120)))
        options.append(
            st.builds(image_uri, st.integers(1, 200), st.integers(1, 200), IMAGE_MODES, IMAGE_FORMATS)
        )
        options.append(st.builds(image_uri, st.sampled_from([2100, 4000]), st.integers(1, 64)))
        options.append(VALID_MASK)
        options.append(st.builds(mask_uri, st.integers(1, 96), st.integers(1, 96), st.just("none")))
    else:
        options.append(valid_value(name, prop))
    if name == STRENGTH:
        options.append(st.sampled_from([0, 0.0, 1e-9, 0.3, 0.5]))
    return st.integers(0, 7).flatmap(lambda draw: invalid if draw == 0 else st.one_of(options))


@st.composite
def mixed_inputs(draw, properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    optional = {name: mixed_value(name, prop) for name, prop in properties.items()}
    inputs = draw(st.fixed_dictionaries({}, optional=optional))
    if draw(st.integers(0, 4)) == 0:
        inputs.update(
            draw(UNKNOWN_KEYS.map(lambda extra: {k: v for k, v in extra.items() if k not in properties}))
        )
    return inputs


def curated_invalid_inputs() -> list[tuple[dict[str, Any], set[str]]]:
    """Invalid values always sent (as hypothesis explicit examples), each in a valid txt2img input:
    every non-image file input for image and for mask, and values a generator seldom draws."""
    base = {"width": 64, "height": 64, STEPS: 1}
    cases = [
        ({**base, name: value}, {name})
        for name in FILE_FIELDS
        for value in [*NOT_IMAGES, truncated_png_uri(), oversized_image_uri()]
    ]
    cases.append(({**base, MASK: mask_uri(64, 64, "none")}, {MASK}))
    cases += [
        ({**base, "prompt": "a cat \ud800"}, {"prompt"}),
        ({**base, "width": 64.0}, {"width"}),
        ({**base, "height": 2**64}, {"height"}),
        ({**base, "width": 100}, {"width"}),
        ({**base, STEPS: 1.5}, {STEPS}),
        ({**base, "seed": -1}, {"seed"}),
        ({**base, "scheduler": "ddim"}, {"scheduler"}),
        ({**base, "output_format": "gif"}, {"output_format"}),
        ({**base, STRENGTH: 1.0000001}, {STRENGTH}),
        ({**base, OUTPAINT_FIELDS[0]: -8}, {OUTPAINT_FIELDS[0]}),
        ({**base, "controlnet_1": "cany"}, {"controlnet_1"}),
        ({**base, "controlnet_2_image": image_uri(64, 64)}, {"controlnet_2_image"}),
        ({**base, "controlnet_1": "shapes-silhouette"}, {"controlnet_1_image"}),
        ({**base, "sizing_strategy": "controlnet_3_image"}, {"sizing_strategy"}),
        ({**base, "return_control_maps": True}, {"return_control_maps"}),
        ({**base, "canny_low_threshold": 250}, {"canny_low_threshold"}),
        ({**base, "hires_scale": 2, IMAGE: image_uri(64, 64)}, {"hires_scale"}),  # text-to-image only
        ({**base, "refine": "expert_ensemble_refiner"}, {"refine"}),  # no refiner loaded
        ({**base, "hires_scale": 2, "hires_denoising_strength": 0.2}, {"hires_denoising_strength"}),
        ({**base, "clip_skip": 12}, {"clip_skip"}),  # more layers than the model has
        ({**base, "clip_skip": 13}, {"clip_skip"}),
    ]
    return cases


# -- hostile inputs: one family per defect class of issue 16 ---------------------------------------

HOSTILE_LIMIT_S = 10.0
"""A hostile input is answered within this (each is refused from a header, a count or a length;
the ones that run are 1-step generations): the quadratic prompt parser took 55 s, the ICO bomb
decoded 177 megapixels first."""


def _bytes_uri(data: bytes, media_type: str = "application/octet-stream") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def hostile_inputs() -> list[tuple[str, dict[str, Any], set[str] | None]]:
    """(label, input, the fields its refusal must name; None: it must succeed), each in a cheap
    text-to-image or image-to-image request."""
    base = {"width": 64, "height": 64, STEPS: 1}
    cases: list[tuple[str, dict[str, Any], set[str] | None]] = []
    for name, (prompt, outcome) in HOSTILE_PROMPTS.items():
        for field_name in ("prompt", "negative_prompt"):
            expected = {field_name} if outcome == "refused" else None
            cases.append((f"{field_name}: {name}", {**base, field_name: prompt}, expected))
    long_lines = "a cat\nNegative prompt: x\nSteps: 999, Sampler: X, Seed: 1\n" * 10
    cases.append(("prompt: forged infotext lines", {**base, "prompt": long_lines}, None))
    cases.append(
        (
            "jpg: prompts beyond 64 KB of EXIF",
            {
                **base,
                "prompt": "\u4e2d" * 19_000,
                "negative_prompt": "\u4e2d" * 19_000,
                "output_format": "jpg",
            },
            {"output_format"},
        )
    )
    cases.append(("seed: the last image past 2^32-1", {**base, "seed": 2**32 - 1, NUM_OUTPUTS: 2}, {"seed"}))
    cases.append(("scheduler: PNDM at 1 step", {**base, "scheduler": "PNDM"}, None))
    cases.append(("scheduler: LCM past 50 steps", {**base, "scheduler": "LCM", STEPS: 51}, {STEPS}))
    images = {
        "an ICO wrapping a 13300x13300 PNG": (ico_bomb(), {IMAGE}),
        **{
            f"a {kind} claiming 20000x20000": (claim(20_000, 20_000), {IMAGE})
            for kind, claim in CLAIMING.items()
        },
        **{f"a {kind} file": (build(), {IMAGE}) for kind, build in REFUSED_FORMATS.items()},
        **{f"a flood of {name} (~32 MB)": (build(), {IMAGE}) for name, build in FLOODS.items()},
        "a 16-bit grey PNG": (grey16_png(32768, (64, 64)), None),
        "a float TIFF": (float_tiff(0.5, (64, 64)), None),
        "an int32 TIFF": (int32_tiff(2**30, (64, 64)), None),
        "a CIELab TIFF": (lab_tiff(50, (64, 64)), None),
        "an animated GIF": (animated("GIF"), None),
        "an animated WebP": (animated("WEBP"), None),
        "an APNG": (animated("PNG"), None),
        "an MPO": (mpo_file(), None),
    }
    for name, (data, expected) in images.items():
        cases.append((f"image: {name}", {**base, IMAGE: _bytes_uri(data), STRENGTH: 1.0}, expected))
        # The same file as a control image: refused naming controlnet_1_image, or read (and the
        # request then refused naming controlnet_1: the bundled ControlNet does not fit this model).
        control = {**base, "controlnet_1": "shapes-silhouette", "controlnet_1_image": _bytes_uri(data)}
        refused = {"controlnet_1_image"} if expected else {"controlnet_1"}
        cases.append((f"controlnet_1_image: {name}", control, refused))
    for field_name in (LORA_WEIGHTS, EMBEDDINGS):  # the server runs with SDCOG_MAX_ADAPTER_MB=1
        for name, uri in hostile_archives(field_name).items():
            cases.append((f"{field_name}: {name}", {**base, field_name: uri}, {field_name}))
    grey = image_uri(64, 64)
    for name, (left, right, expected) in {
        "a 16-bit mask white at 1000/65535": (1000, 1000, {MASK}),
        "a 16-bit mask half white": (0, 60000, None),
    }.items():
        mask = _bytes_uri(grey16_mask_png(left, right, (64, 64)))
        cases.append((f"mask: {name}", {**base, IMAGE: grey, MASK: mask, STRENGTH: 1.0}, expected))
    return cases


def fuzz_hostile_inputs(fuzzer: Fuzzer) -> None:
    phase = "hostile inputs"
    for label, inputs, expected in hostile_inputs():
        if fuzzer.aborted:
            return
        started = time.monotonic()
        verdict = fuzzer.post_json(phase, {"input": inputs})
        elapsed = time.monotonic() - started
        fuzzer.expect(phase, verdict, inputs, succeed=expected is None, names=expected)
        if elapsed > HOSTILE_LIMIT_S:
            fuzzer.problems.append(f"[{phase}] {label}: answered after {elapsed:.1f} s")


def hostile_ids() -> st.SearchStrategy[Any]:
    """Prediction ids for a body: the known hostile ones, arbitrary text, and valid ones."""
    return st.one_of(
        st.sampled_from([*HOSTILE_IDS.values(), *NON_STRING_IDS.values()]),
        st.text(max_size=300),
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        st.sampled_from(list(VALID_IDS.values())),
    )


# -- sending and judging ---------------------------------------------------------------------------

FAILED_WRAPPING = re.compile(r"^(?:(?:Async p|P)rediction failed: )+(?:InputError: )?")
NAMED_ERROR = re.compile(r"^(?P<fields>[a-z_][a-z0-9_]*(?:/[a-z_][a-z0-9_]*)*): ")
PARSE_ERROR = re.compile(
    r"^Failed to (?:parse the request body as JSON|deserialize the JSON body into the target type): "
    r"(?:(?P<path>[A-Za-z_][\w.\[\]]*): )?"
)


@dataclass
class Verdict:
    outcome: str
    """succeeded, failed (a refusal by our rules), 422, 400 (JSON Cog cannot read), or a problem."""
    named: set[str] = field(default_factory=set)
    problem: str | None = None
    excerpt: str = ""
    images: int = 0


def _named_by_path(path: str | None) -> set[str]:
    if not path:
        return {BODY}
    parts = path.split(".")
    return {parts[1].split("[")[0]} if parts[0] == "input" and len(parts) > 1 else {parts[0].split("[")[0]}


def judge(status: int, content: bytes, known: set[str]) -> Verdict:
    """What the server answered, and the fields its refusal names (checked against `known`)."""
    text = content.decode("utf-8", errors="replace")
    excerpt = text[:400]
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status >= 500:
        return Verdict("5xx", problem=f"server error {status}", excerpt=excerpt)
    if status == 409:
        return Verdict("409", problem="409 busy although requests are sent one at a time", excerpt=excerpt)
    if status == 200 and isinstance(body, dict) and body.get("status") == "succeeded":
        output = body.get("output")
        if not (
            isinstance(output, list) and output and all(str(uri).startswith("data:image/") for uri in output)
        ):
            return Verdict("succeeded", problem="succeeded without data-URI images", excerpt=excerpt)
        return Verdict("succeeded", images=len(output), excerpt=f"{len(output)} images")
    if status == 200 and isinstance(body, dict) and body.get("status") == "failed":
        error = str(body.get("error"))
        match = NAMED_ERROR.match(FAILED_WRAPPING.sub("", error))
        named = set(match["fields"].split("/")) if match else set()
        if not named or not named <= known:
            return Verdict(
                "failed", named, problem="failed prediction whose error names no input", excerpt=error[:400]
            )
        return Verdict("failed", named, excerpt=error[:400])
    if status in (400, 422) and isinstance(body, dict) and isinstance(body.get("detail"), list):
        named = set()
        for detail in body["detail"]:
            loc = detail.get("loc") if isinstance(detail, dict) else None
            if isinstance(loc, list) and loc[:2] == ["body", "input"] and len(loc) > 2:
                named.add("input" if loc[2] == "__root__" else str(loc[2]))
            elif isinstance(loc, list) and len(loc) > 1 and loc[0] == "body":
                named.add(str(loc[1]))
            else:
                return Verdict(str(status), problem="a detail without a field in its loc", excerpt=excerpt)
        if not named or not named <= known | set(ENVELOPE_FIELDS):
            return Verdict(str(status), named, problem="422 naming no known field", excerpt=excerpt)
        return Verdict(str(status), named, excerpt=excerpt)
    if status in (400, 415, 422):
        match = PARSE_ERROR.match(text)
        if not match:
            return Verdict(str(status), problem="a refusal in an unknown format", excerpt=excerpt)
        return Verdict(str(status), _named_by_path(match["path"]), excerpt=excerpt)
    return Verdict(str(status), problem=f"unexpected status {status}", excerpt=excerpt)


@dataclass
class Fuzzer:
    url: str
    known: set[str]
    counts: Counter = field(default_factory=Counter)
    by_phase: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")
    aborted: str | None = None
    sent_without_input: bool = False
    client: httpx.Client = field(default_factory=httpx.Client)

    def record(self, phase: str, sent: Any, status: int | None, content: bytes, elapsed: float) -> Verdict:
        shown = _show(sent)
        if elapsed > self.slowest[0]:
            self.slowest = (elapsed, shown[:200])
        if status is None:
            verdict = Verdict("no answer", problem=content.decode(errors="replace"))
        else:
            verdict = judge(status, content, self.known)
        for counter in (self.counts, self.by_phase.setdefault(phase, Counter())):
            counter["requests"] += 1
            counter[verdict.outcome] += 1
        if verdict.problem:
            self.problems.append(
                f"[{phase}] {verdict.problem}: {status} {verdict.excerpt!r}\n    body: {shown}"
            )
        if elapsed > REQUEST_TIMEOUT_S:
            self.problems.append(f"[{phase}] answered after {elapsed:.0f} s (a hang)\n    body: {shown}")
        if status is None or status == 409:
            self.aborted = verdict.problem or "409"
        return verdict

    def wait_until_ready(self) -> bool:
        """Wait for /health-check to say READY. coglet 0.23.1 answers a prediction a few
        milliseconds before it frees the slot, so a POST sent at once may get 409 (measured:
        BUSY for 1-7 ms after 1 answer in 5); a sequential client has to wait, as this one does."""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        polls = 0
        while time.monotonic() < deadline:
            try:
                status = self.client.get(f"{self.url}/health-check", timeout=REQUEST_TIMEOUT_S).json()[
                    "status"
                ]
            except (httpx.HTTPError, ValueError, KeyError) as error:
                status = f"no answer ({type(error).__name__}: {error})"
            if status == READY:
                self.counts["busy after an answer"] += polls > 0
                return True
            if status != "BUSY":
                break
            polls += 1
            time.sleep(0.002)
        self.problems.append(f"the server is not READY before the next request: {status}")
        self.aborted = f"not READY: {status}"
        return False

    def send(self, phase: str, sent: Any, content: bytes | None, headers: dict[str, str]) -> Verdict | None:
        """POST once (no retry, no resend: a second copy of a prediction would meet the first)."""
        if not self.wait_until_ready():
            return None
        started = time.monotonic()
        try:
            response = self.client.post(
                f"{self.url}/predictions", content=content, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
        except httpx.HTTPError as error:
            failure = f"{type(error).__name__}: {error}".encode()
            return self.record(phase, sent, None, failure, time.monotonic() - started)
        return self.record(phase, sent, response.status_code, response.content, time.monotonic() - started)

    def post_json(self, phase: str, body: Any) -> Verdict | None:
        """POST a JSON document (lone surrogates go out as \\ud800 escapes, as a client may send)."""
        content = json.dumps(body, ensure_ascii=True, allow_nan=False).encode()
        return self.send(phase, body, content, {"Content-Type": "application/json"})

    def call(self, phase: str, case: schemathesis.Case) -> Verdict | None:
        """Send a schemathesis case as schemathesis serialises it (its JSON, bytes, or no body)."""
        request = case.as_transport_kwargs(base_url=self.url)
        headers = {str(key): str(value) for key, value in request.get("headers", {}).items()}
        content = request.get("data")
        if "json" in request:
            content = json.dumps(request["json"], ensure_ascii=True).encode()
            headers.setdefault("Content-Type", "application/json")
        if isinstance(content, str):
            content = content.encode()
        return self.send(phase, case.body, content, headers)

    def expect(
        self,
        phase: str,
        verdict: Verdict | None,
        sent: Any,
        *,
        succeed: bool = False,
        names: set[str] | None = None,
    ) -> None:
        """Checks beyond `judge` for bodies whose outcome is known in advance."""
        if verdict is None:
            return
        shown = _show(sent)
        if succeed:
            wanted = sent.get(NUM_OUTPUTS, 1)
            if verdict.outcome != "succeeded":
                self.problems.append(
                    f"[{phase}] a valid input was refused: {verdict.excerpt!r}\n    body: {shown}"
                )
            elif verdict.images != wanted:
                self.problems.append(f"[{phase}] {verdict.images} images, not {wanted}\n    body: {shown}")
        if names is not None:
            if verdict.outcome == "succeeded":
                self.problems.append(
                    f"[{phase}] an invalid input ({sorted(names)}) succeeded\n    body: {shown}"
                )
            elif verdict.named and not verdict.named <= names and not verdict.problem:
                self.problems.append(
                    f"[{phase}] the refusal names {sorted(verdict.named)}, not the invalid {sorted(names)}: "
                    f"{verdict.excerpt!r}\n    body: {shown}"
                )

    def check_body_level(self, phase: str, verdict: Verdict | None, sent: Any) -> None:
        """Only a body that is not a JSON object may be refused without a field named."""
        if verdict is not None and BODY in verdict.named and isinstance(sent, dict):
            self.problems.append(
                f"[{phase}] a JSON object refused without a field named: {verdict.excerpt!r}\n"
                f"    body: {_show(sent)}"
            )


def _show(body: Any) -> str:
    if isinstance(body, NotSet):
        return "<no body>"
    if isinstance(body, bytes | str):
        return repr(body[:300])
    try:
        text = json.dumps(body, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(body)
    return text if len(text) <= 600 else text[:600] + f"... ({len(text)} characters)"


def _cheap_case_body(body: Any, fuzzer: Fuzzer) -> Any:
    """A schemathesis body with `cheapen` applied to its input, and without a string `id`: coglet
    0.23.1 uses the id as a directory name, so an id too long for a file name wedges the server
    and one with "../" escapes its directory (tests/test_stuck_slot.py); deploy/front.py holds ids to
    the documented rule, and `fuzz_ids_through_the_front` sends it every kind.
    No body, or one without `input` (or with `"input": null`), runs every default, 30 steps: the
    first such case is sent as it is, later ones get `cheapen({})` as their input."""
    if isinstance(body, NotSet) or (isinstance(body, dict) and body.get("input") is None):
        if not fuzzer.sent_without_input:
            fuzzer.sent_without_input = True
            return body
        body = {} if isinstance(body, NotSet) else body
    if not isinstance(body, dict):
        return body
    body = {key: value for key, value in body.items() if not (key == "id" and isinstance(value, str))}
    if body.get("input") is None:
        body["input"] = {}
    if isinstance(body["input"], dict):
        body["input"] = cheapen(body["input"])
    return body


# -- the tests -------------------------------------------------------------------------------------

FUZZ_SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def written_schema():
    return write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")


@pytest.fixture(scope="module")
def adapter_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def fuzz_server(written_schema, tiny_sd15, adapter_cache):
    # Private and link-local URLs (10.0.0.1, 169.254.169.254) are among the inputs: make sure the
    # server refuses them rather than fetching, whatever the environment says.
    # One torch thread: the tiny model gains nothing from two, and while another torch process is
    # busy on the same 2 cores, OpenMP's spinning barriers make each step ~30x slower (measured).
    # Hugging Face and Replicate references resolve to 127.0.0.1:1 (refused as loopback): offline.
    env = {
        "MODEL_WEIGHTS": str(tiny_sd15),
        "SDCOG_ALLOW_LOCAL_URLS": "0",
        "OMP_NUM_THREADS": "1",
        "HF_ENDPOINT": f"https://{LOOPBACK_CLOSED_PORT}",
        "SDCOG_REPLICATE_ENDPOINT": f"https://{LOOPBACK_CLOSED_PORT}",
        "SDCOG_ADAPTER_CACHE": str(adapter_cache),
        "SDCOG_MAX_ADAPTER_MB": "1",  # tests/hostile_archives.py's archives are sized for it
    }
    with running_server(PROJECT_ROOT, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_front(fuzz_server):
    """deploy/front.py (the sample deployment's front, which holds prediction ids to the documented
    rule) before the fuzz server; yields its URL."""
    command = [
        sys.executable,
        str(PROJECT_ROOT / "deploy" / "front.py"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "PORT": str(fuzz_server.port)}, stdout=subprocess.PIPE, text=True
    )
    try:
        banner = process.stdout.readline()  # "front on 127.0.0.1:<port>, to 127.0.0.1:<server port>"
        port = re.search(r"127\.0\.0\.1:(\d+),", banner)[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def fuzz_ids_through_the_front(fuzzer: Fuzzer, front_url: str) -> None:
    """Bodies with every kind of `id`, sent through the front: an id the rule admits runs, any other
    is refused with 422 naming `id`, and the server never sees it (it would wedge or escape)."""
    phase = "ids through the front"
    through = Fuzzer(front_url, known=fuzzer.known, client=fuzzer.client)
    cheap = {"width": 64, "height": 64, STEPS: 1}

    @settings(max_examples=HOSTILE_ID_EXAMPLES, **FUZZ_SETTINGS)
    @given(prediction_id=hostile_ids())
    def send_id(prediction_id):
        if through.aborted:
            return
        body = {"id": prediction_id, "input": cheap}
        valid = isinstance(prediction_id, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", prediction_id)
        verdict = through.post_json(phase, body)
        through.expect(phase, verdict, cheap, succeed=bool(valid), names=None if valid else {"id"})

    for value in [*HOSTILE_IDS.values(), *NON_STRING_IDS.values()]:
        send_id = example(prediction_id=value)(send_id)
    send_id()
    fuzzer.problems += through.problems
    fuzzer.aborted = fuzzer.aborted or through.aborted
    fuzzer.by_phase[phase] = through.counts
    fuzzer.counts.update(through.counts)


class _FuzzFigures:
    """Adds the fuzz counts to pytest's terminal summary (like conftest's oracle figures)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("fuzz: inputs sent to the Cog server")
            for line in self.lines:
                terminalreporter.write_line(line)


def _report(fuzzer: Fuzzer, seconds: float) -> list[str]:
    order = ("requests", "succeeded", "failed", "422", "400", "5xx", "409", "no answer")
    lines = []
    for name, counter in [*fuzzer.by_phase.items(), ("total", fuzzer.counts)]:
        extra = sorted(set(counter) - set(order))
        cells = [
            f"{key} {counter[key]}" for key in (*order, *extra) if counter[key] or key in ("requests", "5xx")
        ]
        lines.append(f"{name:24s} " + ", ".join(cells))
    lines.append(
        f"slowest request: {fuzzer.slowest[0]:.2f} s (limit {REQUEST_TIMEOUT_S} s): {fuzzer.slowest[1]}"
    )
    lines.append(f"problems: {len(fuzzer.problems)}; fuzzing took {seconds:.0f} s")
    return lines


def fuzz_with_schemathesis(fuzzer: Fuzzer, operation, mode: GenerationMode, examples: int) -> None:
    phase = f"schemathesis {mode.value}"

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(case=operation.as_strategy(generation_mode=mode))
    def schemathesis_case(case):
        if fuzzer.aborted:
            return
        case.body = _cheap_case_body(case.body, fuzzer)
        fuzzer.check_body_level(phase, fuzzer.call(phase, case), case.body)

    schemathesis_case()


def test_fuzz_the_server_with_1000_inputs_no_5xx_every_refusal_names_the_field(
    fuzz_server, fuzz_front, adapter_cache, written_schema, request
):
    served = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=10).json()
    assert served["paths"] == written_schema["paths"], "GET /openapi.json lacks the paths cog build writes"
    assert set(served["paths"]) == {
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}/cancel",
        "/trainings",  # train.py (cog.yaml's train:), merged in as cog build does
        "/trainings/{training_id}/cancel",
    }
    properties = input_properties(served)
    assert {*SIZE_FIELDS, STEPS, STRENGTH, NUM_OUTPUTS, *FILE_FIELDS, *OUTPAINT_FIELDS} <= set(properties)
    fuzzer = Fuzzer(fuzz_server.url, known=set(properties))
    request.addfinalizer(fuzzer.client.close)
    # Positive cases come from the document with `input` required in PredictionRequest: in the served
    # one it is optional, and 4 in 10 positive bodies then leave it out (all defaults: one request).
    with_input = json.loads(json.dumps(served))
    with_input["components"]["schemas"]["PredictionRequest"]["required"] = ["input"]
    positive = schemathesis.openapi.from_dict(with_input)["/predictions"]["POST"]
    negative = schemathesis.openapi.from_dict(served)["/predictions"]["POST"]
    started = time.monotonic()

    fuzz_with_schemathesis(fuzzer, positive, GenerationMode.POSITIVE, SCHEMATHESIS_POSITIVE)
    fuzz_with_schemathesis(fuzzer, negative, GenerationMode.NEGATIVE, SCHEMATHESIS_NEGATIVE)

    @settings(max_examples=HYPOTHESIS_VALID, **FUZZ_SETTINGS)
    @given(inputs=valid_inputs(properties))
    def valid(inputs):
        if not fuzzer.aborted:
            fuzzer.expect(
                "hypothesis valid",
                fuzzer.post_json("hypothesis valid", {"input": inputs}),
                inputs,
                succeed=True,
            )

    @settings(max_examples=HYPOTHESIS_INVALID, **FUZZ_SETTINGS)
    @given(case=invalid_inputs(properties))
    def invalid(case):
        inputs, broken = case
        if not fuzzer.aborted:
            verdict = fuzzer.post_json("hypothesis invalid", {"input": inputs})
            fuzzer.expect("hypothesis invalid", verdict, inputs, names=broken)
            fuzzer.check_body_level("hypothesis invalid", verdict, inputs)

    for case in curated_invalid_inputs():
        invalid = example(case=case)(invalid)

    @settings(max_examples=HYPOTHESIS_MIXED, **FUZZ_SETTINGS)
    @given(inputs=mixed_inputs(properties))
    def mixed(inputs):
        if not fuzzer.aborted:
            inputs = cheapen(inputs)
            fuzzer.check_body_level(
                "hypothesis mixed", fuzzer.post_json("hypothesis mixed", {"input": inputs}), inputs
            )

    reference_input = {"prompt": "a red circle", "seed": 5, "width": 64, "height": 64, STEPS: 2}
    before = fuzzer.client.post(
        f"{fuzz_server.url}/predictions", json={"input": reference_input}, timeout=REQUEST_TIMEOUT_S
    ).json()
    valid()
    invalid()
    mixed()
    fuzz_hostile_inputs(fuzzer)
    fuzz_ids_through_the_front(fuzzer, fuzz_front)

    lines = _report(fuzzer, time.monotonic() - started)
    print("\n" + "\n".join(lines))
    figures = _FuzzFigures()
    figures.lines = lines
    request.config.pluginmanager.register(figures, f"sdcog-fuzz-figures-{id(figures)}")

    alive = fuzz_server.process.poll() is None
    ready = alive and fuzzer.wait_until_ready()  # READY within REQUEST_TIMEOUT_S, else a problem
    if fuzzer.aborted or fuzzer.problems:
        log = "\n".join(line[:600] for line in fuzz_server.log().splitlines()[-30:])
        problems = "\n".join(fuzzer.problems[:25])
        pytest.fail(
            f"{len(fuzzer.problems)} problems (the first 25):\n{problems}\n"
            + (f"fuzzing stopped: {fuzzer.aborted}\nthe server's log:\n{log}" if fuzzer.aborted else "")
        )
    assert fuzzer.counts["requests"] >= MIN_REQUESTS, fuzzer.counts
    assert fuzzer.counts["5xx"] == 0, fuzzer.counts
    assert alive, f"the server exited with {fuzz_server.process.returncode}"
    assert ready and fuzz_server.health()["status"] == READY
    after = fuzzer.client.post(
        f"{fuzz_server.url}/predictions", json={"input": reference_input}, timeout=REQUEST_TIMEOUT_S
    ).json()
    assert after["status"] == "succeeded" and after["output"] == before["output"]  # nothing leaked
    # Every adapter reference sent was refused: nothing it fetched or unpacked stays on disk.
    assert sorted(path.name for path in adapter_cache.iterdir()) in ([], ["references.json"])
