"""Request resolution: defaults from the model family, and field-named refusals before any work."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdcog.fetch.adapter_references import parse_reference
from sdcog.model.families import SD1, SDXL
from sdcog.resolve.request import SEED_MAX, InputError, ModelLimits, resolve_request
from sdcog.resolve.schedulers import SCHEDULER_NAMES

SD15 = ModelLimits(family=SD1, native_width=512, native_height=512)
XL = ModelLimits(family=SDXL, native_width=1024, native_height=1024)


def test_defaults_come_from_the_model_family():
    sd = resolve_request(SD15, prompt="a cat", seed=1)
    xl = resolve_request(XL, prompt="a cat", seed=1)
    assert (sd.width, sd.height, sd.guidance_scale) == (512, 512, 7.5)
    assert (xl.width, xl.height, xl.guidance_scale) == (1024, 1024, 7.0)
    assert sd.num_inference_steps == SD1.default_steps
    assert (sd.num_outputs, sd.scheduler, sd.output_format) == (1, "DPM++ 2M Karras", "webp")


def test_one_size_given_keeps_the_native_other_side():
    request = resolve_request(SD15, prompt="a cat", width=768)
    assert (request.width, request.height) == (768, 512)


def test_image_i_uses_seed_plus_i():
    assert resolve_request(SD15, prompt="x", seed=41, num_outputs=3).seeds == [41, 42, 43]


@given(seed=st.none() | st.integers(SEED_MAX - 8, SEED_MAX), num_outputs=st.integers(1, 4))
def test_every_image_of_a_batch_can_be_made_again_alone(seed, num_outputs):
    """Issue 16: seed=4294967295 with num_outputs=2 embedded seed 4294967296, which is refused."""
    try:
        request = resolve_request(SD15, prompt="x", seed=seed, num_outputs=num_outputs, width=64, height=64)
    except InputError as error:
        assert error.field == "seed" and seed + num_outputs - 1 > SEED_MAX
        assert f"use a seed up to {SEED_MAX - num_outputs + 1}" in str(error)
        return
    for image_seed in request.seeds:
        assert resolve_request(SD15, prompt="x", seed=image_seed, width=64, height=64).seeds == [image_seed]


def test_missing_seed_is_drawn_from_the_32_bit_range():
    seeds = {resolve_request(SD15, prompt="x").seed for _ in range(50)}
    assert len(seeds) > 45
    assert all(0 <= seed <= SEED_MAX for seed in seeds)
    assert max(seeds) > 2**16  # drawn from the full range, not a small one


def test_empty_negative_prompt_means_none():
    assert resolve_request(SD15, prompt="x", negative_prompt=None).negative_prompt == ""


@pytest.mark.parametrize(
    ("inputs", "field", "fragment"),
    [
        ({"width": 100}, "width", "multiple of 8"),
        ({"height": 516}, "height", "multiple of 8"),
        ({"width": 32}, "width", "between 64 and 2048"),
        ({"num_outputs": 99}, "num_outputs", "between 1 and 4"),
        ({"num_outputs": 0}, "num_outputs", "between 1 and 4"),
        ({"num_inference_steps": 0}, "num_inference_steps", "between 1 and 500"),
        ({"guidance_scale": -1.0}, "guidance_scale", "between 0.0 and 30.0"),
        ({"scheduler": "Euler-ish"}, "scheduler", "must be one of"),
        ({"output_format": "gif"}, "output_format", "must be one of"),
        ({"output_quality": 0}, "output_quality", "between 1 and 100"),
        ({"seed": -5}, "seed", "between 0 and"),
        ({"seed": 2**40}, "seed", "between 0 and"),
        ({"width": "512"}, "width", "an integer"),
        ({"num_outputs": 2.5}, "num_outputs", "an integer"),
        ({"num_outputs": True}, "num_outputs", "an integer"),
        ({"guidance_scale": "high"}, "guidance_scale", "a number"),
        ({"prompt": 42}, "prompt", "a string"),
    ],
)
def test_bad_input_is_refused_naming_the_field(inputs, field, fragment):
    arguments = {"prompt": "a cat", **inputs}
    with pytest.raises(InputError) as refusal:
        resolve_request(SD15, **arguments)
    assert refusal.value.field == field
    assert str(refusal.value).startswith(f"{field}: ")
    assert fragment in str(refusal.value)


def test_pixel_budget_is_per_family_and_counts_outputs():
    resolve_request(XL, prompt="x", width=1536, height=1536, num_outputs=4)  # fits SDXL's budget
    with pytest.raises(InputError, match="budget of Stable Diffusion 1.x") as refusal:
        resolve_request(SD15, prompt="x", width=1536, height=1536, num_outputs=4)
    assert "num_outputs" in refusal.value.field
    resolve_request(SD15, prompt="x", width=1536, height=1536, num_outputs=1)
    with pytest.raises(InputError, match="smaller size or fewer outputs"):
        resolve_request(XL, prompt="x", width=2048, height=2048, num_outputs=4)


@given(
    width=st.integers(8, 256).map(lambda n: n * 8),
    height=st.integers(8, 256).map(lambda n: n * 8),
    num_outputs=st.integers(1, 4),
    steps=st.integers(1, 500),
    guidance=st.floats(0, 30),
    scheduler=st.sampled_from(SCHEDULER_NAMES),
    seed=st.none() | st.integers(0, SEED_MAX),
)
def test_valid_inputs_resolve_or_fail_only_on_the_budget_or_the_batch_seed_range(
    width, height, num_outputs, steps, guidance, scheduler, seed
):
    arguments = dict(
        prompt="p",
        width=width,
        height=height,
        num_outputs=num_outputs,
        num_inference_steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seed=seed,
    )
    if width * height * num_outputs > SD1.pixel_budget:
        with pytest.raises(InputError):
            resolve_request(SD15, **arguments)
        return
    if seed is not None and seed + num_outputs - 1 > SEED_MAX:  # the last image's seed must be one too
        with pytest.raises(InputError, match="^seed: "):
            resolve_request(SD15, **arguments)
        return
    request = resolve_request(SD15, **arguments)
    assert (request.width, request.height, request.num_outputs) == (width, height, num_outputs)
    assert len(request.seeds) == num_outputs
    if seed is not None:
        assert request.seed == seed


@given(width=st.integers(64, 2048).filter(lambda n: n % 8))
def test_every_width_off_the_grid_is_refused(width):
    with pytest.raises(InputError, match="^width: must be a multiple of 8"):
        resolve_request(SD15, prompt="p", width=width)


# -- LoRA inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "location", "file", "name"),
    [
        ("https://example.com/loras/Pixel%20Art.safetensors?x=1", "url", None, None, "Pixel Art"),
        ("huggingface.co/owner/repo", "huggingface", "owner/repo", None, "repo"),
        (
            "https://huggingface.co/owner/repo/sub/style.safetensors",
            "huggingface",
            "owner/repo",
            "sub/style.safetensors",
            "style",
        ),  # noqa: E501
        ("hf:owner/repo/a.safetensors@v2", "huggingface", "owner/repo", "a.safetensors", "a"),
        (
            "https://huggingface.co/owner/repo/blob/main/b.safetensors",
            "huggingface",
            "owner/repo",
            "b.safetensors",
            "b",
        ),  # noqa: E501
        (
            "jakedahn/flux-midsummer-blues",
            "replicate",
            "jakedahn/flux-midsummer-blues",
            None,
            "flux-midsummer-blues",
        ),  # noqa: E501
        ("replicate.com/owner/model/versions/0123abcd", "replicate", "owner/model/0123abcd", None, "model"),
        ("data:;base64,AAAA", "data", "data:;base64,AAAA", None, "inline"),
    ],
)
def test_lora_references_of_every_kind_parse_without_the_network(text, kind, location, file, name):
    reference = parse_reference("lora_weights", text)
    assert (reference.kind, reference.file, reference.name) == (kind, file, name)
    assert reference.location == (location or text)


def test_lora_weights_and_scales_pair_up_and_bad_ones_name_their_field():
    limits = ModelLimits(SD1, 512, 512)
    both = "a/b, https://x.org/c.safetensors"
    request = resolve_request(limits, prompt="x", lora_weights=both, lora_scales="0.5")
    assert [(lora.reference.name, lora.scale) for lora in request.loras] == [("b", 0.5), ("c", 0.5)]
    request = resolve_request(limits, prompt="x", lora_weights="a/b\nc/d", lora_scales="1, -0.5")
    assert [lora.scale for lora in request.loras] == [1.0, -0.5]
    assert resolve_request(limits, prompt="x").loras == ()
    request = resolve_request(limits, prompt="x", lora_weights="data:;base64,AAAA, a/b")
    assert [lora.reference.kind for lora in request.loras] == ["data", "replicate"]
    for inputs, field, message in [
        (dict(lora_weights="a/b c/d", lora_scales="1, 2, 3"), "lora_scales", "3 values for 2 LoRAs"),
        (dict(lora_weights="a/b", lora_scales="strong"), "lora_scales", "must be numbers"),
        (dict(lora_weights="a/b", lora_scales="9"), "lora_scales", "between -4.0 and 4.0"),
        (dict(lora_scales="1"), "lora_scales", "names no LoRA"),
        (dict(lora_weights="a/b c/d e/f g/h i/j"), "lora_weights", "the limit is 4"),
        (dict(lora_weights="not a reference!"), "lora_weights", "is not a reference this model reads"),
        (dict(lora_weights="ftp://x.org/a.safetensors"), "lora_weights", "is not a reference"),
    ]:
        with pytest.raises(InputError, match=message) as error:
            resolve_request(limits, prompt="x", **inputs)
        assert error.value.field == field


def test_embeddings_take_an_optional_word_and_bad_ones_name_the_field():
    limits = ModelLimits(SD1, 512, 512)
    text = "easyneg=https://x.org/e.safetensors?a=b, https://x.org/bad-hands-5.safetensors\nTOK=owner/model"
    request = resolve_request(limits, prompt="x", embeddings=text + " w=data:;base64,AA==")
    assert [(e.token, e.reference.kind, e.reference.name) for e in request.embeddings] == [
        ("easyneg", "url", "e"),
        (None, "url", "bad-hands-5"),
        ("TOK", "replicate", "model"),
        ("w", "data", "inline"),
    ]
    assert request.embeddings[0].reference.location == "https://x.org/e.safetensors?a=b"
    assert resolve_request(limits, prompt="x", embeddings=" , ").embeddings == ()
    for embeddings, message in [
        ("a=x/y, A=x/z", "gives the token 'a' to two embeddings"),
        (" ".join(f"w{index}=x/y" for index in range(9)), "the limit is 8"),
        ("(w)=x/y", "is not a reference this model reads"),
        ("w=ftp://x.org/a.safetensors", "is not a reference"),
    ]:
        with pytest.raises(InputError, match=message) as error:
            resolve_request(limits, prompt="x", embeddings=embeddings)
        assert error.value.field == "embeddings"
