"""Prompts past CLIP's 77 tokens and AUTOMATIC1111 attention weights, on SD 1.5 and SDXL."""

import time

import numpy as np
import pytest
from hostile_prompts import HOSTILE_PROMPTS

from sdcog.errors import InputError
from sdcog.generate.cancellation import CancelFlag, Cancelled
from sdcog.generate.engine import Engine
from sdcog.generate.prompt_encoding import MAX_PROMPT_TOKENS, WINDOW_TOKENS
from sdcog.generate.prompt_syntax import MAX_WEIGHT, Fragment, PromptSyntaxError, parse_weighted_prompt
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.request import resolve_request
from sdcog_tools.shapes import judge


@pytest.mark.parametrize(
    ("prompt", "fragments"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("(a cat)", [("a cat", 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("a (cat:1.3) dog", [("a ", 1.0), ("cat", 1.3), (" dog", 1.0)]),
        ("a (b (c:2) d) e", [("a ", 1.0), ("b ", 1.1), ("c", 2.2), (" d", 1.1), (" e", 1.0)]),
        ("(cat:1.3)(dog:1.3)", [("cat", 1.3), ("dog", 1.3)]),
        (r"\(literal\) and \[x\]", [("(literal) and [x]", 1.0)]),
        ("time: 3 pm", [("time: 3 pm", 1.0)]),
        ("a (left open", [("a ", 1.0), ("left open", 1.1)]),
        ("closed) alone", [("closed", 1.0), (") alone", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_automatic1111_attention_syntax(prompt, fragments):
    parsed = parse_weighted_prompt(prompt)
    assert [fragment.text for fragment in parsed] == [text for text, _ in fragments]
    assert [fragment.weight for fragment in parsed] == pytest.approx([weight for _, weight in fragments])
    assert all(isinstance(fragment, Fragment) for fragment in parsed)


@pytest.fixture(scope="module")
def engines(tiny_sd15, tiny_sdxl):
    return {"sd15": Engine.load(tiny_sd15), "sdxl": Engine.load(tiny_sdxl)}


def generate(engine, prompt, negative_prompt=None, **inputs):
    request = resolve_request(
        engine.limits,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        num_inference_steps=4,
        seed=11,
        **inputs,
    )
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def long_prompt(engine, tokens):
    """A prompt of at least `tokens` tokens, and its first 75 tokens (what one CLIP window holds)."""
    words = []
    tokenizer = engine.prompts.tokenizers[0]
    head = ["a", "red", "circle", "on", "a", "blue", "background,"]
    tail = ["yellow", "square", "purple", "triangle", "green", "orange", "sky", "grass", "night"]

    def count():
        return len(tokenizer(" ".join(words), add_special_tokens=False).input_ids)

    while count() < WINDOW_TOKENS:  # the first window and the rest say different things
        words.append(head[len(words) % len(head)])
    while count() < tokens:
        words.append(tail[len(words) % len(tail)])
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
    return " ".join(words), tokenizer.decode(ids[:WINDOW_TOKENS])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_200_token_prompt_is_not_cut_at_77_tokens(engines, family):
    engine = engines[family]
    prompt, first_window = long_prompt(engine, 200)
    assert engine.prompts.parse("prompt", prompt).tokens >= 200
    assert np.abs(generate(engine, prompt) - generate(engine, first_window)).mean() > 0.5
    # The same long prompt twice: the same pixels; as a negative prompt too.
    assert np.array_equal(generate(engine, prompt), generate(engine, prompt))
    assert np.abs(generate(engine, "a red circle", prompt) - generate(engine, "a red circle")).mean() > 0.5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weights_change_the_image_and_weight_1_changes_nothing(engines, family):
    engine = engines[family]
    plain = generate(engine, "a red circle on a blue background")
    assert np.array_equal(generate(engine, "a red (circle:1.0) on a blue background"), plain)
    assert not np.array_equal(generate(engine, "a red (circle:1.6) on a blue background"), plain)
    assert not np.array_equal(generate(engine, "a red [[circle]] on a blue background"), plain)


def test_a_prompt_over_the_limit_is_refused_naming_the_field(engines):
    engine = engines["sd15"]
    prompt, _ = long_prompt(engine, MAX_PROMPT_TOKENS + 5)
    with pytest.raises(InputError, match=f"the limit is {MAX_PROMPT_TOKENS}") as error:
        generate(engine, "a red circle", negative_prompt=prompt)
    assert error.value.field == "negative_prompt"


@pytest.mark.parametrize("name", HOSTILE_PROMPTS)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_any_prompt_is_read_or_refused_in_linear_time(engines, name, field):
    """Issue 16: the attention parser was quadratic (72 KB of "(a" took 55 s before its refusal).
    Each hostile prompt is refused naming its field, or read, within a fraction of a second."""
    prompt, outcome = HOSTILE_PROMPTS[name]
    engine = engines["sd15"]
    other = "prompt" if field == "negative_prompt" else "negative_prompt"
    started = time.perf_counter()
    try:
        request = resolve_request(engine.limits, **{field: prompt, other: "x"}, seed=1)
        engine.prompts.arguments(request.prompt, request.negative_prompt)
    except InputError as error:
        assert outcome == "refused", f"{name}: {error}"
        assert error.field == field
    else:
        assert outcome == "runs", f"{name} was not refused"
    assert time.perf_counter() - started < 1.0  # the quadratic parser: 1.2 s at 6,000 brackets


def test_the_model_reads_what_the_infotext_can_give_back(engines):
    """Leading and trailing separators (\\x1c-\\x1f) would be CLIP tokens that the infotext's
    readers strip: the model reads the prompt without them (tests/test_outputs.py: the infotext)."""
    parse = engines["sd15"].prompts.parse
    assert parse("prompt", "\x1c a red\x1ecircle \x1f\n").text == "a red\x1ecircle"


def test_weights_past_the_limit_are_refused_and_nesting_multiplies():
    assert parse_weighted_prompt("(" * 48 + "a" + ")" * 48)[0].weight == pytest.approx(1.1**48)
    with pytest.raises(PromptSyntaxError, match=f"over {MAX_WEIGHT:g}"):
        parse_weighted_prompt("(" * 49 + "a" + ")" * 49)
    with pytest.raises(PromptSyntaxError):
        parse_weighted_prompt("(a:-101)")
    assert parse_weighted_prompt("(a:-100)")[0].weight == -100


def test_a_cancel_before_the_first_step_runs_no_step(sd15):
    flag = CancelFlag()
    flag.set()
    steps = []
    original = sd15.pipeline.unet.forward
    sd15.pipeline.unet.forward = lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs)
    try:
        with pytest.raises(Cancelled, match="canceled before the first denoising step"):
            sd15.generate(resolve_request(sd15.limits, prompt="(a" * 3000 + ")" * 3000, seed=1), flag)
    finally:
        del sd15.pipeline.unet.forward
    assert steps == []


def test_weighting_steers_the_bundled_model():
    """The shapes model draws "a red green circle" red; weakening "red" lets green through."""
    engine = Engine.load(BUNDLED_MODEL_DIR)

    def colours(prompt):
        request = resolve_request(engine.limits, prompt=prompt, seed=0, num_outputs=4)
        return [judge(image).colour for image in engine.generate(request).images]

    assert colours("a red green circle on a blue background").count("red") >= 3
    assert colours("a (red:0.3) green circle on a blue background").count("red") <= 1
