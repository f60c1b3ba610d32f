"""A single-file checkpoint through Cog's real HTTP server: it serves every mode; declared a
few-step model, its defaults fill omitted inputs and yield to given ones; its Model hash is in the
metadata; clip_skip's refusals name the field."""

import hashlib
import json

import numpy as np
import pytest
from test_http import FAST, assert_refused, data_uri, decode, gradient, inpaint_right_half, pixels, succeed

from sdcog.model.weights import PROJECT_ROOT, SOURCE_FILE
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server
from sdcog_tools.single_file_checkpoints import save_checkpoint_dir


@pytest.fixture(scope="module")
def checkpoint(tiny_sd15, tmp_path_factory):
    """tiny SD 1.5 as one file beside its configs, declared a 4-step Lightning model the way
    `script/download-weights --few-step lightning-4` records it."""
    file = save_checkpoint_dir(
        tiny_sd15, tmp_path_factory.mktemp("single-file"), name="tiny-sd15.safetensors"
    )
    (file.parent / SOURCE_FILE).write_text(json.dumps({"checkpoint": file.name, "few_step": "lightning-4"}))
    return file


@pytest.fixture(scope="module")
def server(checkpoint):
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    with running_server(PROJECT_ROOT, env={"MODEL_WEIGHTS": str(checkpoint.parent)}) as running:
        yield running


def fields_of(body, tmp_path, index=0):
    return parse_infotext_fields(read_infotext(decode(body["output"][index], tmp_path, index)[1]))


def test_the_few_step_defaults_apply_when_omitted_and_yield_when_given(server, checkpoint, tmp_path):
    omitted = {name: value for name, value in FAST.items() if name != "num_inference_steps"}
    response = server.predict({**omitted, "seed": 1, "output_format": "png"})
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    fields = fields_of(body, tmp_path)
    assert (fields["Steps"], fields["CFG scale"], fields["Sampler"]) == ("4", "0", "Euler")
    assert fields["Few-step"] == "Lightning 4-step" and fields["Timestep spacing"] == "trailing"
    assert fields["Model hash"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert fields["Model"] == "tiny-sd15"
    given = succeed(
        server, seed=1, output_format="png", num_inference_steps=3, guidance_scale=7.5, scheduler="DDIM"
    )
    fields = fields_of(given, tmp_path)
    assert (fields["Steps"], fields["CFG scale"], fields["Sampler"]) == ("3", "7.5", "DDIM")
    skipped = succeed(server, seed=1, output_format="png", clip_skip=2)
    assert fields_of(skipped, tmp_path)["Clip skip"] == "2"


def test_a_single_file_model_serves_every_mode(server, tmp_path):
    source = gradient(96, 64)
    text = succeed(server, seed=2)
    assert decode(text["output"][0], tmp_path)[0].size == (64, 64)
    image_to_image = succeed(server, image=data_uri(source), prompt_strength=0.5, width=None, height=None)
    assert decode(image_to_image["output"][0], tmp_path)[0].size == (96, 64)
    inpainted = inpaint_right_half(server, source)
    image = decode(inpainted["output"][0], tmp_path)[0]
    assert np.array_equal(pixels(image)[:, :48], pixels(source)[:, :48])
    outpainted = succeed(server, image=data_uri(source), outpaint_right=32, width=None, height=None)
    assert decode(outpainted["output"][0], tmp_path)[0].size == (128, 64)


@pytest.mark.parametrize(
    ("bad", "status"), [({"clip_skip": 13}, 422), ({"clip_skip": 0}, 422), ({"clip_skip": 3}, 200)]
)
def test_clip_skip_refusals_name_the_field(server, bad, status):
    body = assert_refused(server, bad, status, "clip_skip")
    if status == 200:
        assert "has 2 layers" in body["error"]
