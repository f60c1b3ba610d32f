"""The random-weight pipelines are real architectures that load offline like downloaded ones."""

import json

import pytest
import torch
from accelerate import init_empty_weights

from sdcog.random_pipelines import PRESETS, build_pipeline, make_tokenizer


def test_tiny_pipelines_are_saved_as_safetensors_only(tiny_pipelines):
    for directory in tiny_pipelines.values():
        files = [path.name for path in directory.rglob("*") if path.is_file()]
        assert any(name.endswith(".safetensors") for name in files)
        assert not any(name.endswith((".bin", ".ckpt", ".pt")) for name in files)
        assert "images are noise" in (directory / "README.md").read_text()


def test_model_index_names_the_real_pipeline_classes(tiny_sd15, tiny_sdxl):
    assert (
        json.loads((tiny_sd15 / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    )
    assert (
        json.loads((tiny_sdxl / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    )


def test_vae_downsamples_by_eight_like_the_real_one():
    pipeline = build_pipeline("tiny-sd15")
    assert pipeline.vae_scale_factor == 8
    latents = pipeline.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_same_seed_gives_the_same_weights():
    first, second, other = (
        build_pipeline("tiny-sd15", 1),
        build_pipeline("tiny-sd15", 1),
        build_pipeline("tiny-sd15", 2),
    )
    weight = "conv_in.weight"
    assert torch.equal(first.unet.state_dict()[weight], second.unet.state_dict()[weight])
    assert not torch.equal(first.unet.state_dict()[weight], other.unet.state_dict()[weight])


def test_tokenizer_keeps_common_words_whole_and_pads_to_77():
    tokenizer = make_tokenizer()
    assert tokenizer.tokenize("a red circle on a blue background") == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "a</w>",
        "blue</w>",
        "background</w>",
    ]
    ids = tokenizer("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.pad_token_id
    assert tokenizer.tokenize("zebra")  # unknown words fall back to byte-level pieces
    assert make_tokenizer(pad_token="!").pad_token == "!"  # as SDXL's second tokenizer


@pytest.mark.parametrize("preset", ["sd15-real-arch", "sdxl-real-arch"])
def test_real_size_presets_have_the_published_parameter_counts(preset):
    with init_empty_weights():
        pipeline = build_pipeline(preset)
    unet_parameters = sum(p.numel() for p in pipeline.unet.parameters())
    expected = {"sd15-real-arch": 859_520_964, "sdxl-real-arch": 2_567_463_684}[preset]
    assert unet_parameters == expected
    assert pipeline.vae_scale_factor == 8


def test_presets_are_described():
    assert all(preset.description for preset in PRESETS.values())
