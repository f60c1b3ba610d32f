"""trained_model.tar (issue 19): its LoRA loads in diffusers from either file with the same
images, and the tar itself serves as this model's `lora_weights`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from hostile_archives import data_uri
from safetensors.torch import load
from test_lora_training import SETTINGS, image, training_images
from test_loras import generate as generate_with_loras

from sdcog.fetch.adapter_cache import AdapterCache
from sdcog.generate.engine import Engine
from sdcog.train.lora_training import LoraSettings, train_lora
from sdcog.train.output import (
    CARD_FILE,
    CURVE_FILE,
    EMBEDDINGS_FILE,
    KOHYA_FILE,
    LORA_FILE,
    PARAMS_FILE,
    write_trained_model,
)

PIVOTAL = LoraSettings(**{**SETTINGS.__dict__, "pivotal_tokens": 2, "ti_learning_rate": 0.5})


def trained_tar(pipeline, settings: LoraSettings, folder) -> Path:
    result = train_lora(pipeline, training_images(64), settings)
    inputs = {
        "max_train_steps": settings.max_train_steps,
        "lora_rank": settings.lora_rank,
        "seed": settings.seed,
    }
    return write_trained_model(folder / "trained_model.tar", result, inputs, trigger_word="TOK")


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    return pipeline, trained_tar(pipeline, SETTINGS, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def pivotal(tiny_pipelines, tmp_path_factory):
    """Trained with the trigger word's embeddings, on SD 1.x and SDXL (two text encoders)."""
    tars = {}
    for name in ("tiny-sd15", "tiny-sdxl"):
        pipeline = DiffusionPipeline.from_pretrained(tiny_pipelines[name], local_files_only=True)
        tars[name] = trained_tar(pipeline, PIVOTAL, tmp_path_factory.mktemp(name))
    return tars


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def test_the_tar_holds_both_lora_formats_the_trigger_word_a_card_and_the_loss_curve(trained):
    _, path = trained
    files = members(path)
    assert set(files) == {LORA_FILE, KOHYA_FILE, PARAMS_FILE, CARD_FILE, CURVE_FILE}
    assert json.loads(files[PARAMS_FILE]) == {"TOK": "TOK"}
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


def generator(engine: Engine, cache: AdapterCache):
    """tests/test_loras.py's `generate`, prompting the trigger word by default."""

    def generate(lora_weights=None, prompt="a photo of TOK", **inputs):
        return generate_with_loras(engine, cache, lora_weights, prompt=prompt, **inputs)

    return generate


def test_the_tar_is_a_lora_weights_input_of_this_model(trained, tiny_sd15, tmp_path):
    _, path = trained
    engine = Engine.load(tiny_sd15)
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)
    pixels = generator(engine, cache)

    def generate(lora_weights):
        return pixels(lora_weights)[0]

    (tmp_path / "lora.safetensors").write_bytes(members(path)[LORA_FILE])
    from_tar = generate(data_uri(path.read_bytes()))
    direct = generate(data_uri((tmp_path / "lora.safetensors").read_bytes()))
    assert np.array_equal(from_tar, direct)
    assert np.abs(from_tar - generate(None)).max() > 0


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_pivotal_tuning_ships_the_trigger_words_embeddings_which_lora_weights_applies_by_itself(
    pivotal, family, tiny_pipelines, tmp_path
):
    path = pivotal[family]
    files = members(path)
    assert json.loads(files[PARAMS_FILE]) == {"TOK": "<s0><s1>"}  # Replicate's trainers' format
    vectors = load(files[EMBEDDINGS_FILE])
    automatic1111 = load(files["TOK.safetensors"])
    if family == "tiny-sdxl":
        assert set(vectors) == {"text_encoders_0", "text_encoders_1"} and set(automatic1111) == {
            "clip_l",
            "clip_g",
        }
    else:
        assert set(vectors) == {"text_encoders_0"} and set(automatic1111) == {"emb_params"}
    assert all(len(tensor) == 2 and tensor.abs().sum() > 0 for tensor in vectors.values())
    engine = Engine.load(tiny_pipelines[family])
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)
    generate = generator(engine, cache)
    with_tar, generation = generate(data_uri(path.read_bytes()))
    assert [embedding.name for embedding in generation.embeddings] == ["TOK"]
    # The same as the LoRA alone with the embeddings given by hand under the trigger word.
    (tmp_path / "lora.safetensors").write_bytes(files[LORA_FILE])
    (tmp_path / "TOK.safetensors").write_bytes(files["TOK.safetensors"])
    by_hand, _ = generate(data_uri(files[LORA_FILE]), embeddings=f"TOK={data_uri(files['TOK.safetensors'])}")
    assert np.array_equal(with_tar, by_hand)
    lora_only, _ = generate(data_uri(files[LORA_FILE]))
    assert np.abs(with_tar - lora_only).max() > 0  # the word stands for the trained vectors
    # A prompt without the word runs as with the LoRA alone; the slots are empty again afterwards.
    assert np.array_equal(
        generate(data_uri(path.read_bytes()), prompt="a photo")[0],
        generate(data_uri(files[LORA_FILE]), prompt="a photo")[0],
    )
    # replicate_weights, as Replicate passes a trained version's tar, is the same LoRA at scale 1.
    assert np.array_equal(generate(replicate_weights=data_uri(path.read_bytes()))[0], with_tar)
