"""The contract through Cog's real HTTP server on 127.0.0.1, with tiny real-architecture pipelines."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from sdcog.model.weights import PROJECT_ROOT
from sdcog.resolve.request import SEED_MAX
from sdcog.resolve.schedulers import SCHEDULER_NAMES
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import ServerError, running_server

FAST = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 3}
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def schema_file():
    return write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")


@pytest.fixture(scope="module")
def sdxl_server(schema_file, tiny_sdxl):
    with running_server(PROJECT_ROOT, env={"MODEL_WEIGHTS": str(tiny_sdxl)}) as server:
        yield server


def succeed(server, **inputs):
    """A prediction that must succeed; an input given as None is left out (Cog refuses JSON null)."""
    merged = {name: value for name, value in {**FAST, **inputs}.items() if value is not None}
    response = server.predict(merged)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def decode(data_uri, tmp_path, index=0):
    header, payload = data_uri.split(",", 1)
    data = base64.b64decode(payload)
    path = tmp_path / f"image-{index}"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image, path


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("output_format", ["png", "jpg", "webp"])
def test_prediction_returns_num_outputs_images_of_the_asked_size_and_format(
    sd15_server, output_format, tmp_path
):
    body = succeed(sd15_server, num_outputs=3, width=96, height=72, output_format=output_format, seed=4)
    assert len(body["output"]) == 3
    for index, uri in enumerate(body["output"]):
        assert uri.startswith(f"data:image/{'jpeg' if output_format == 'jpg' else output_format};base64,")
        image, path = decode(uri, tmp_path, index)
        assert image.format == FORMATS[output_format]
        assert image.size == (96, 72)
        assert parse_infotext_fields(read_infotext(path))["Seed"] == str(4 + index)


def test_same_seed_gives_the_same_pixels_and_image_2_matches_seed_plus_1(sd15_server, tmp_path):
    pair = [
        pixels(decode(uri, tmp_path)[0])
        for uri in succeed(sd15_server, seed=1000, num_outputs=2, output_format="png")["output"]
    ]
    [again] = [
        pixels(decode(uri, tmp_path)[0])
        for uri in succeed(sd15_server, seed=1000, num_outputs=2, output_format="png")["output"][:1]
    ]
    [alone] = [
        pixels(decode(uri, tmp_path)[0])
        for uri in succeed(sd15_server, seed=1001, output_format="png")["output"]
    ]
    assert np.array_equal(pair[0], again)
    difference = np.abs(pair[1] - alone)
    # Batched float math may round a rare pixel one level differently (see test_engine).
    assert difference.max() <= 2 and (difference == 0).mean() > 0.99
    assert not np.array_equal(pair[0], pair[1])


def test_png_parameters_chunk_holds_the_seed_and_the_seed_is_logged(sd15_server, tmp_path):
    body = succeed(sd15_server, seed=31337, output_format="png", negative_prompt="green")
    image, _ = decode(body["output"][0], tmp_path)
    parameters = image.info["parameters"]
    assert parameters.splitlines()[:2] == ["a red circle on a blue background", "Negative prompt: green"]
    assert "Seed: 31337" in parameters and "Size: 64x64" in parameters and "Steps: 3" in parameters
    assert "image 0: seed 31337" in body["logs"]


def test_the_logs_carry_progress_that_replicates_clients_parse(sd15_server):
    body = succeed(sd15_server, num_inference_steps=3)
    # replicate-python's Prediction.progress (and the JavaScript, Go and Rust clients): the last
    # matching line of the logs.
    pattern = re.compile(r"^\s*(?P<percentage>\d+)%\s*\|.+?\|\s*(?P<current>\d+)\/(?P<total>\d+)")
    progress = [match.groups() for line in body["logs"].split("\n") if (match := pattern.match(line))]
    assert progress and progress[-1] == ("100", "3", "3")


def test_missing_seed_is_drawn_logged_and_embedded(sd15_server, tmp_path):
    body = succeed(sd15_server, output_format="png")
    image, _ = decode(body["output"][0], tmp_path)
    seed = int(parse_infotext_fields(image.info["parameters"])["Seed"])
    assert 0 <= seed <= SEED_MAX
    assert f"image 0: seed {seed}" in body["logs"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs(sd15_server, scheduler, tmp_path):
    body = succeed(sd15_server, scheduler=scheduler, seed=2, num_inference_steps=2, output_format="png")
    image, _ = decode(body["output"][0], tmp_path)
    assert image.size == (64, 64)


def test_sdxl_pipeline_serves_reproducible_predictions(sdxl_server, tmp_path):
    first = succeed(sdxl_server, seed=8, num_outputs=2, width=80, height=64, output_format="png")["output"]
    second = succeed(sdxl_server, seed=8, num_outputs=2, width=80, height=64, output_format="png")["output"]
    images = [decode(uri, tmp_path)[0] for uri in first]
    assert [image.size for image in images] == [(80, 64), (80, 64)]
    assert np.array_equal(pixels(images[0]), pixels(decode(second[0], tmp_path)[0]))
    assert "Seed: 9" in images[1].info["parameters"]


def assert_refused(server, bad, status, named):
    """422 naming the field (schema rules), or a failed prediction whose error names it (the rest);
    either way the server is READY afterwards."""
    response = server.predict({**FAST, **bad})
    assert response.status_code == status
    body = response.json()
    if status == 422:
        assert any(named in detail["loc"] for detail in body["detail"]), body
    else:
        assert body["status"] == "failed" and named in body["error"], body
    assert server.settled_status() == "READY"
    return body


BAD_INPUTS = [
    # Rules the schema holds: Cog's server answers 422 naming the field.
    ({"num_outputs": 99}, 422, "num_outputs"),
    ({"scheduler": "Euler-ish"}, 422, "scheduler"),
    ({"guidance_scale": -1}, 422, "guidance_scale"),
    ({"width": "wide"}, 422, "width"),
    ({"num_inference_steps": 2.5}, 422, "num_inference_steps"),
    ({"seed": "lucky"}, 422, "seed"),
    ({"output_format": "gif"}, 422, "output_format"),
    ({"prompt": None}, 422, "prompt"),
    # Rules a JSON schema cannot express: the prediction fails with the field in the message.
    ({"width": 100}, 200, "width: must be a multiple of 8"),
    ({"height": 516}, 200, "height: must be a multiple of 8"),
    ({"width": 2048, "height": 2048, "num_outputs": 4}, 200, "width/height/num_outputs"),
]


@pytest.mark.parametrize(("bad", "status", "named"), BAD_INPUTS, ids=[str(bad) for bad, _, _ in BAD_INPUTS])
def test_bad_input_is_refused_naming_the_field_and_the_server_stays_ready(sd15_server, bad, status, named):
    body = assert_refused(sd15_server, bad, status, named)
    if status == 200:
        assert "budget" in body["error"] or "nearest" in body["error"]
    succeed(sd15_server, seed=1)


def test_setup_without_weights_fails_with_what_to_run(schema_file, tmp_path):
    with pytest.raises(ServerError) as failure:
        with running_server(PROJECT_ROOT, env={"MODEL_WEIGHTS": str(tmp_path / "nothing-here")}, timeout=120):
            pass
    message = str(failure.value)
    assert "MODEL_WEIGHTS" in message and "script/download-weights" in message


def data_uri(image, image_format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return Image.fromarray(
        np.stack([x + 0 * y, 0 * x + y, np.full((height, width), 90.0)], axis=2).astype(np.uint8)
    )


def right_half_mask(width, height):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("server_name", ["sd15_server", "sdxl_server"])
def test_img2img_returns_the_input_size_rounded_to_multiples_of_8(server_name, request, tmp_path):
    server = request.getfixturevalue(server_name)
    body = succeed(
        server, image=data_uri(gradient(100, 60)), prompt_strength=0.5, num_outputs=2, width=None, height=None
    )
    images = [decode(uri, tmp_path, index)[0] for index, uri in enumerate(body["output"])]
    assert [image.size for image in images] == [(104, 64), (104, 64)]
    assert "img2img: prompt_strength 0.5 ran 1 of 3 denoising steps" in body["logs"]


def inpaint_right_half(server, source, **inputs):
    """Inpainting of the right half of `source` (a 96x64 gradient), at full strength, as PNG."""
    return succeed(
        server,
        image=data_uri(source),
        mask=data_uri(right_half_mask(96, 64)),
        prompt_strength=1.0,
        width=None,
        height=None,
        output_format="png",
        **inputs,
    )


def test_inpainting_keeps_every_unmasked_pixel_byte_identical(sd15_server, tmp_path):
    source = gradient(96, 64)
    body = inpaint_right_half(sd15_server, source, seed=12)
    image, path = decode(body["output"][0], tmp_path)
    kept = pixels(image)[:, :48]
    assert np.array_equal(kept, pixels(source)[:, :48])
    assert np.abs(pixels(image)[:, 52:] - pixels(source)[:, 52:]).mean() > 10
    fields = parse_infotext_fields(read_infotext(path))
    assert fields["Mode"] == "inpaint" and fields["Denoising strength"] == "1"


def test_outpainting_returns_the_extended_size_with_the_original_in_place(sd15_server, tmp_path):
    source = gradient(64, 64)
    body = succeed(
        sd15_server,
        image=data_uri(source),
        outpaint_left=32,
        outpaint_bottom=16,
        width=None,
        height=None,
        output_format="png",
    )
    image, _ = decode(body["output"][0], tmp_path)
    assert image.size == (96, 80)
    assert np.array_equal(pixels(image)[0:64, 32:96], pixels(source))


IMAGE_BAD_INPUTS = [
    ({"mask": data_uri(right_half_mask(64, 64))}, 200, "mask: needs an image"),
    (
        {"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
        200,
        "image: is not a readable",
    ),
    (
        {"image": data_uri(gradient(64, 64)), "mask": data_uri(Image.new("L", (64, 64), 0))},
        200,
        "mask: is all black",
    ),
    ({"outpaint_top": 64}, 200, "outpaint_top: needs an image"),
    ({"image": data_uri(gradient(64, 64)), "prompt_strength": 1.5}, 422, "prompt_strength"),
    ({"image": data_uri(gradient(64, 64)), "outpaint_left": -8}, 422, "outpaint_left"),
]


@pytest.mark.parametrize(
    ("bad", "status", "named"), IMAGE_BAD_INPUTS, ids=[named for _, _, named in IMAGE_BAD_INPUTS]
)
def test_bad_image_inputs_are_refused_naming_the_field(sd15_server, bad, status, named):
    assert_refused(sd15_server, bad, status, named)
