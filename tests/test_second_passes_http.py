"""Hires fix, refiner and watermark inputs through Cog's real server (the bundled model): a hires
fix returns the final size with AUTOMATIC1111's fields; each new input's refusal names it."""

import base64
import io

import pytest
from PIL import Image
from test_http import assert_refused

from sdcog.write.infotext import parse_infotext_fields

BASE = {
    "prompt": "a red circle on a blue background",
    "num_inference_steps": 8,
    "seed": 2,
    "output_format": "png",
}


def test_a_hires_fix_returns_the_final_size_and_says_how_it_was_made(bundled_server):
    body = bundled_server.predict(
        {**BASE, "hires_scale": 2, "hires_steps": 6, "hires_upscaler": "Lanczos"}
    ).json()
    assert body["status"] == "succeeded", body.get("error")
    with Image.open(io.BytesIO(base64.b64decode(body["output"][0].split(",", 1)[1]))) as image:
        assert image.size == (128, 128)
        fields = parse_infotext_fields(image.info["parameters"])
    assert fields["Size"] == "64x64" and fields["Hires upscale"] == "2" and fields["Hires steps"] == "6"
    assert fields["Hires upscaler"] == "Lanczos" and fields["Denoising strength"] == "0.55"
    assert fields["Watermark"] == "none (128x128 is under the library's 256x256 pixels)"
    assert "100%|██████████| 11/11" in body["logs"]  # 8 + int(6 x 0.55) steps, one total


REFUSED = [
    ({"hires_scale": 4.5}, 422, "hires_scale"),
    ({"hires_scale": 0.5}, 422, "hires_scale"),
    ({"hires_steps": -1}, 422, "hires_steps"),
    ({"hires_denoising_strength": 1.5}, 422, "hires_denoising_strength"),
    ({"hires_upscaler": "ESRGAN_4x"}, 422, "hires_upscaler"),
    ({"refine": "both"}, 422, "refine"),
    ({"high_noise_frac": 2}, 422, "high_noise_frac"),
    ({"refine_steps": 0}, 422, "refine_steps"),
    ({"apply_watermark": "maybe"}, 422, "apply_watermark"),
    ({"refine": "expert_ensemble_refiner"}, 200, "refine: expert_ensemble_refiner needs the SDXL refiner"),
    ({"hires_scale": 2, "hires_denoising_strength": 0.01}, 200, "hires_denoising_strength: "),
    ({"hires_scale": 4, "width": 1024, "height": 1024}, 200, "hires_scale/width/height/num_outputs: "),
]


@pytest.mark.parametrize(("bad", "status", "named"), REFUSED, ids=[str(bad) for bad, _, _ in REFUSED])
def test_each_new_input_is_refused_naming_it(bundled_server, bad, status, named):
    assert_refused(bundled_server, bad, status, named)
