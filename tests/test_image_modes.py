"""Image-to-image, inpainting and outpainting in-process, on the tiny SD 1.x and SDXL pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdcog.fetch.images import Outpaint, paste_back
from sdcog.generate.engine import Engine
from sdcog.resolve.request import InputError, Mode, resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import generation_infotext

STEPS = 10


def photo(width=100, height=60):
    """A stand-in photo: a gradient with a disc and a bar, so layout is measurable."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 90.0),
        ],
        axis=2,
    )
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 45, 45), fill=(230, 30, 30))
    draw.rectangle((60, 20, 90, 30), fill=(20, 20, 200))
    return image


def half_mask(size):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((size[0] // 2, 0, size[0], size[1]), fill=255)
    return mask


@pytest.fixture(scope="module", params=["tiny_sd15", "tiny_sdxl"])
def engine(request):
    return Engine.load(request.getfixturevalue(request.param))


def run(engine, **inputs):
    arguments = {"prompt": "a red circle on a blue background", "num_inference_steps": STEPS, "seed": 3}
    arguments.update(inputs)
    request = resolve_request(engine.limits, **arguments)
    return request, engine.generate(request).images


def as_array(image):
    return np.asarray(image, dtype=np.int16)


def test_img2img_output_is_the_input_size_rounded_to_multiples_of_8(engine):
    request, images = run(engine, image=photo(100, 60), num_outputs=2)
    assert request.mode == Mode.IMAGE_TO_IMAGE
    assert [image.size for image in images] == [(104, 64), (104, 64)]


def test_img2img_with_width_and_height_resizes_the_input(engine):
    _, [image] = run(engine, image=photo(100, 60), width=64, height=96)
    assert image.size == (64, 96)


def vae_round_trip(engine, image):
    """What the input looks like through the VAE alone: the random-weight VAE cannot reproduce a
    photo, so closeness to the input is measured against this, the zero-strength result."""
    pipeline = engine.pipeline
    with torch.no_grad():
        pixels = pipeline.image_processor.preprocess(image).to(pipeline.vae.dtype)
        decoded = pipeline.vae.decode(pipeline.vae.encode(pixels).latent_dist.mean).sample
    return pipeline.image_processor.postprocess(decoded, output_type="pil")[0]


def test_lower_strength_stays_closer_to_the_input(engine):
    source = photo(96, 64)
    reference = as_array(vae_round_trip(engine, source))
    distances = {}
    for strength in (0.2, 0.5, 0.9):
        _, [image] = run(engine, image=source, prompt_strength=strength)
        distances[strength] = np.abs(as_array(image) - reference).mean()
    # Measured (mean absolute difference, 0-255; the random VAE's own sampling noise is most of it):
    # tiny-sd15 {0.2: 42.3, 0.5: 45.9, 0.9: 47.9}, tiny-sdxl {0.2: 42.3, 0.5: 43.6, 0.9: 44.0}.
    assert distances[0.2] < distances[0.5] < distances[0.9], distances


def test_img2img_and_inpainting_are_reproducible_with_a_seed(engine):
    for extra in ({}, {"mask": half_mask((96, 64))}):
        _, [first] = run(engine, image=photo(96, 64), seed=42, **extra)
        _, [second] = run(engine, image=photo(96, 64), seed=42, **extra)
        _, [other] = run(engine, image=photo(96, 64), seed=43, **extra)
        assert np.array_equal(as_array(first), as_array(second))
        assert not np.array_equal(as_array(first), as_array(other))


def test_inpainting_keeps_every_unmasked_pixel_and_repaints_the_masked_ones(engine):
    source = photo(96, 64)
    request, images = run(engine, image=source, mask=half_mask((96, 64)), prompt_strength=1.0, num_outputs=2)
    assert request.mode == Mode.INPAINT
    keep = np.asarray(request.mask_image) == 0
    for image in images:
        assert np.array_equal(as_array(image)[keep], as_array(source)[keep])
        assert np.abs(as_array(image)[~keep] - as_array(source)[~keep]).mean() > 10


def test_a_mask_of_another_size_is_resized_to_the_image(engine):
    request, [image] = run(engine, image=photo(96, 64), mask=half_mask((48, 32)))
    assert request.mask_image.size == (96, 64) == image.size
    assert np.array_equal(np.asarray(request.mask_image), np.asarray(half_mask((96, 64))))


def test_outpainting_extends_the_canvas_with_the_original_in_place(engine):
    source = photo(96, 64)
    request, [image] = run(engine, image=source, outpaint=Outpaint(left=16, top=0, right=20, bottom=8))
    assert image.size == (136, 72)  # 96 + 16 + 20 = 132, rounded up to 136 on the right; 64 + 8
    inner = as_array(image)[0:64, 16:112]
    assert np.array_equal(inner, as_array(source))
    assert request.mode == Mode.INPAINT and "Outpaint" in generation_infotext(request, 3, "tiny")


def test_switching_modes_leaks_nothing_into_the_next_request(engine):
    _, [before] = run(engine, width=64, height=64)
    run(engine, image=photo(), prompt_strength=0.3, scheduler="K_EULER_ANCESTRAL")
    run(engine, image=photo(96, 64), mask=half_mask((96, 64)))
    _, [after] = run(engine, width=64, height=64)
    assert np.array_equal(as_array(before), as_array(after))


def test_metadata_records_the_mode_and_the_strength(engine):
    request, _ = run(engine, image=photo(96, 64), prompt_strength=0.6, num_inference_steps=5)
    fields = parse_infotext_fields(generation_infotext(request, 3, "tiny"))
    assert fields["Mode"] == "img2img" and fields["Denoising strength"] == "0.6"


def test_steps_run_follow_diffusers_strength_semantics(engine, caplog):
    with caplog.at_level("INFO", logger="sdcog.generate.engine"):
        run(engine, image=photo(96, 64), prompt_strength=0.5, num_inference_steps=9)
    assert "prompt_strength 0.5 ran 4 of 9 denoising steps" in caplog.text  # int(9 x 0.5)


def test_paste_back_feathers_only_inside_the_mask():
    original = Image.new("RGB", (32, 32), (0, 0, 0))
    generated = Image.new("RGB", (32, 32), (200, 200, 200))
    mask = half_mask((32, 32))
    result = as_array(paste_back(generated, original, mask))
    assert (result[:, :16] == 0).all()  # kept side untouched
    assert result[:, -1].min() == 200  # deep inside: fully generated
    assert 0 <= result[16, 16, 0] < 200  # at the seam: blended


@pytest.mark.parametrize(
    ("inputs", "field", "fragment"),
    [
        ({"mask": half_mask((64, 64))}, "mask", "needs an image"),
        ({"outpaint": Outpaint(top=64)}, "outpaint_top", "needs an image"),
        ({"image": photo(), "mask": Image.new("L", (100, 60), 0)}, "mask", "all black"),
        ({"image": photo(), "prompt_strength": 1.5}, "prompt_strength", "between 0.0 and 1.0"),
        ({"image": photo(), "prompt_strength": 0.01}, "prompt_strength", "no denoising step"),
        ({"image": photo(4000, 3000)}, "image", "set width and/or height"),
        ({"image": photo(), "width": 100}, "width", "multiple of 8"),
        ({"image": photo(), "outpaint": Outpaint(left=-8)}, "outpaint_left", "between 0 and 1024"),
        ({"image": photo(2000, 64), "outpaint": Outpaint(right=400)}, "outpaint_right", "at most 2048"),
    ],
)
def test_bad_image_inputs_are_refused_naming_the_field(inputs, field, fragment):
    from sdcog.model.families import SD1
    from sdcog.resolve.request import ModelLimits

    with pytest.raises(InputError) as refusal:
        resolve_request(ModelLimits(SD1, 512, 512), prompt="x", **inputs)
    assert refusal.value.field == field and fragment in str(refusal.value)


def test_every_mode_runs_on_the_loaded_modules_without_copies(engine):
    loaded = engine.pipeline
    for extra in ({}, {"image": photo(96, 64)}, {"image": photo(96, 64), "mask": half_mask((96, 64))}):
        request = resolve_request(engine.limits, prompt="x", num_inference_steps=STEPS, **extra)
        per_request = engine._pipeline_for(request)
        assert per_request.unet is loaded.unet and per_request.vae is loaded.vae
        assert per_request.text_encoder is loaded.text_encoder
        assert per_request.scheduler is not loaded.scheduler
