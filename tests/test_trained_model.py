"""trained_model.tar (issue 19): its LoRA loads in diffusers from either file with the same
images, and the tar itself serves as this model's `lora_weights`."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from hostile_archives import data_uri
from test_lora_training import SETTINGS, image, training_images

from sdcog.fetch.adapter_cache import AdapterCache
from sdcog.generate.engine import Engine
from sdcog.resolve.request import resolve_request
from sdcog.train.lora_training import train_lora
from sdcog.train.output import CARD_FILE, CURVE_FILE, KOHYA_FILE, LORA_FILE, PARAMS_FILE, write_trained_model


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    result = train_lora(pipeline, training_images(64), SETTINGS)
    path = tmp_path_factory.mktemp("trained") / "trained_model.tar"
    inputs = {
        "max_train_steps": SETTINGS.max_train_steps,
        "lora_rank": SETTINGS.lora_rank,
        "seed": SETTINGS.seed,
    }
    write_trained_model(path, result.unet_layers, result.losses, inputs, trigger_word="TOK")
    return pipeline, path


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def test_the_tar_holds_both_lora_formats_the_trigger_word_a_card_and_the_loss_curve(trained):
    _, path = trained
    files = members(path)
    assert set(files) == {LORA_FILE, KOHYA_FILE, PARAMS_FILE, CARD_FILE, CURVE_FILE}
    assert json.loads(files[PARAMS_FILE])["trigger_word"] == "TOK"
    assert (
        "`max_train_steps`: 4" in files[CARD_FILE].decode() and "a photo of TOK" in files[CARD_FILE].decode()
    )
    assert files[CURVE_FILE].startswith(b"\x89PNG")
    assert not [name for name in path.parent.iterdir() if name.name.startswith(".")]  # no partial file


def test_the_diffusers_and_the_kohya_files_load_in_diffusers_and_give_the_same_images(trained, tmp_path):
    pipeline, path = trained
    files = members(path)
    before = image(pipeline)
    drawn = {}
    for name in (LORA_FILE, KOHYA_FILE):
        (tmp_path / name).write_bytes(files[name])
        pipeline.load_lora_weights(tmp_path / name, adapter_name="check")
        drawn[name] = image(pipeline)
        pipeline.delete_adapters("check")
    assert np.abs(drawn[LORA_FILE] - before).max() > 0.01
    assert np.abs(drawn[LORA_FILE] - drawn[KOHYA_FILE]).max() < 1e-4


def test_the_tar_is_a_lora_weights_input_of_this_model(trained, tiny_sd15, tmp_path):
    _, path = trained
    engine = Engine.load(tiny_sd15)
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)

    def generate(lora_weights):
        request = resolve_request(
            engine.limits,
            prompt="a photo of TOK",
            width=64,
            height=64,
            num_inference_steps=2,
            seed=1,
            lora_weights=lora_weights,
        )
        adapters = cache.fetch_for(request)
        try:
            return np.asarray(engine.generate(request, adapters=adapters).images[0], dtype=np.int16)
        finally:
            cache.release(adapters)

    (tmp_path / "lora.safetensors").write_bytes(members(path)[LORA_FILE])
    from_tar = generate(data_uri(path.read_bytes()))
    direct = generate(data_uri((tmp_path / "lora.safetensors").read_bytes()))
    assert np.array_equal(from_tar, direct)
    assert np.abs(from_tar - generate(None)).max() > 0
