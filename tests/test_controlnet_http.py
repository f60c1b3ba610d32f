"""ControlNets through Cog's real HTTP server on the bundled model: each mode steered by the bundled
ControlNet, two at once, the control maps returned, the size taken from a control image, and each
refusal naming its field."""

import base64
import io

import pytest
from diffusers import UNet2DConditionModel
from lora_files import StaticServer
from PIL import Image

from sdcog.write.infotext import parse_infotext_fields
from sdcog_tools.random_pipelines import random_controlnet
from sdcog_tools.shapes import overlap, silhouette


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture(scope="module")
def files(tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("xl-controlnet")
    random_controlnet(UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet"), 3).save_pretrained(out)
    served = StaticServer({"/xl.safetensors": (out / "diffusion_pytorch_model.safetensors").read_bytes()})
    yield served
    served.close()


@pytest.fixture(scope="module")
def http(bundled_server):
    return bundled_server


PROMPT = "a red circle on a blue background"
BOX = (30, 26, 58, 54)
STEERED = {
    "prompt": PROMPT,
    "seed": 3,
    "num_inference_steps": 12,
    "output_format": "png",
    "controlnet_1": "shapes-silhouette",
    "controlnet_1_image": data_uri(silhouette("circle", BOX)),
}


def predict(http, inputs):
    body = http.predict(inputs).json()
    assert body["status"] == "succeeded", body.get("error")
    return [decoded(uri) for uri in body["output"]]


def test_each_mode_is_steered_by_the_bundled_controlnet_and_says_so_in_its_metadata(http):
    wanted = silhouette("circle", BOX)
    image, control_map = predict(http, {**STEERED, "return_control_maps": True})
    assert overlap(image, wanted) >= 0.5, "the circle is where the silhouette is"
    assert (
        "Module: none, Model: shapes-silhouette ["
        in parse_infotext_fields(image.info["parameters"])["ControlNet 0"]
    )
    assert control_map.size == (64, 64) and control_map.info["parameters"].startswith("controlnet_1 map")
    background = Image.new("RGB", (64, 64), (40, 70, 220))
    (steered,) = predict(http, {**STEERED, "image": data_uri(background), "prompt_strength": 0.8})
    assert overlap(steered, wanted) >= 0.3  # measured 0.68; 0.0 without the ControlNet
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 20, 64, 60))
    (inpainted,) = predict(http, {**STEERED, "image": data_uri(background), "mask": data_uri(mask)})
    fields = parse_infotext_fields(inpainted.info["parameters"])
    assert fields["Mode"] == "inpaint" and "ControlNet 0" in fields


def test_two_controlnets_at_once_and_the_size_from_a_control_image(http):
    wide = silhouette("square", (8, 8, 40, 40), size=64).resize((96, 64))
    images = predict(
        http,
        {
            **STEERED,
            "controlnet_2": "shapes-silhouette",
            "controlnet_2_image": data_uri(wide),
            "controlnet_2_conditioning_scale": 0.5,
            "controlnet_2_start": 0.1,
            "controlnet_2_end": 0.6,
            "sizing_strategy": "controlnet_2_image",
        },
    )
    (image,) = images
    assert image.size == (96, 64)
    fields = parse_infotext_fields(image.info["parameters"])
    assert "Weight: 0.5" in fields["ControlNet 1"] and "Guidance End: 0.6" in fields["ControlNet 1"]


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        (
            {"controlnet_1_image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
            "controlnet_1_image",
            "is not a readable image",
        ),
        ({"controlnet_1": "cany"}, "controlnet_1", "not a ControlNet name"),
        ({"controlnet_1": "XL"}, "controlnet_1", "is a ControlNet for Stable Diffusion XL"),
        (
            {"controlnet_1": "canny", "controlnet_1_preprocessor": "depth"},
            "controlnet_1_preprocessor",
            "download-weights",
        ),
        (
            {"controlnet_1_start": 0.9, "controlnet_1_end": 0.5},
            "controlnet_1_start",
            "below controlnet_1_end",
        ),
        (
            {"controlnet_2_image": data_uri(silhouette("circle", BOX))},
            "controlnet_2_image",
            "names no ControlNet",
        ),
    ],
)
def test_each_refusal_names_its_field(http, files, inputs, field, words):
    if inputs.get("controlnet_1") == "XL":
        inputs = {**inputs, "controlnet_1": f"{files.url}/xl.safetensors"}
    body = http.predict({**STEERED, **inputs}).json()
    assert body["status"] == "failed", body
    error = body["error"].split("InputError: ", 1)[-1]  # Cog's "Prediction failed: ..." wrapping
    assert error.startswith(f"{field}: ") and words in error, error


def test_a_scale_out_of_range_is_refused_by_the_schema_naming_the_field(http):
    response = http.predict({**STEERED, "controlnet_1_conditioning_scale": 5})
    assert response.status_code == 422 and "controlnet_1_conditioning_scale" in response.text
