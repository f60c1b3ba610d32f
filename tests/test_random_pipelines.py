"""The random-weight pipelines are real architectures that load offline like downloaded ones."""

import json
import random

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sdcog_tools.random_pipelines import (
    EOS,
    PRESETS,
    WORDS,
    _learn_merges,
    build_pipeline,
    main,
    make_tokenizer,
    save_pipeline,
)

PIPELINE_CLASSES = {"tiny-sd15": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
REAL_SIZE = ("sd15-real-arch", "sdxl-real-arch")


@pytest.fixture(scope="module", params=sorted(PIPELINE_CLASSES))
def loaded(request, tiny_pipelines):
    """Each tiny preset as the project loads weights: from the folder, offline, safetensors only."""
    pipeline = DiffusionPipeline.from_pretrained(
        tiny_pipelines[request.param], local_files_only=True, use_safetensors=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return request.param, pipeline


@pytest.fixture(scope="module")
def real_size():
    """The real-size presets on the meta device: their modules and configs, with no weights."""
    with init_empty_weights():
        return {preset: build_pipeline(preset) for preset in REAL_SIZE}


def test_tiny_pipelines_are_small_safetensors_folders(tiny_pipelines):
    for directory in tiny_pipelines.values():
        files = [path for path in directory.rglob("*") if path.is_file()]
        names = [path.name for path in files]
        assert any(name.endswith(".safetensors") for name in names)
        assert not any(name.endswith((".bin", ".ckpt", ".pt", ".pth")) for name in names)
        assert sum(path.stat().st_size for path in files) < 8_000_000
        assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(names)
        assert "images are noise" in (directory / "README.md").read_text()


def test_model_index_names_the_real_pipeline_classes(tiny_pipelines):
    for preset, directory in tiny_pipelines.items():
        model_index = json.loads((directory / "model_index.json").read_text())
        assert model_index["_class_name"] == PIPELINE_CLASSES[preset].__name__


@pytest.mark.parametrize("width, height", [(64, 64), (128, 96)])
def test_saved_pipelines_load_offline_and_make_images_of_the_requested_size(loaded, width, height):
    preset, pipeline = loaded
    assert type(pipeline) is PIPELINE_CLASSES[preset]
    generator = torch.Generator().manual_seed(0)
    result = pipeline("a red circle", width=width, height=height, num_inference_steps=2, generator=generator)
    assert [image.size for image in result.images] == [(width, height)]


def test_saved_tokenizers_pad_to_77_as_the_real_ones_do(loaded):
    preset, pipeline = loaded
    # SDXL's second tokenizer pads with "!" (as the real checkpoint's does), the others with EOS
    pads = {"tokenizer": EOS, "tokenizer_2": "!"} if preset == "tiny-sdxl" else {"tokenizer": EOS}
    for name, pad_token in pads.items():
        tokenizer = getattr(pipeline, name)
        assert isinstance(tokenizer, CLIPTokenizer)
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad_token
        ids = tokenizer("a blue square", padding="max_length", max_length=77, truncation=True).input_ids
        words = tokenizer.convert_tokens_to_ids(["a</w>", "blue</w>", "square</w>"])
        assert len(ids) == 77
        assert ids[:5] == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
        assert set(ids[5:]) == {tokenizer.pad_token_id}


def test_saved_vocab_json_and_merges_txt_alone_make_the_same_tokenizer(tiny_sd15, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_sd15 / "tokenizer" / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    saved = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    text = "A photo of a Purple Heart, zebra café 123"
    assert from_files(text).input_ids == saved(text).input_ids


def test_tokenizer_keeps_common_words_whole():
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
    assert [word for word in WORDS if tokenizer.tokenize(word) != [f"{word}</w>"]] == []
    assert len(tokenizer.tokenize("zebra")) > 1  # unknown words fall back to smaller pieces
    assert tokenizer.decode(tokenizer("a Big dog!").input_ids, skip_special_tokens=True) == "a big dog !"


def test_merges_do_not_depend_on_the_word_order():
    shuffled = WORDS[:]
    random.Random(0).shuffle(shuffled)
    assert _learn_merges(shuffled) == _learn_merges(WORDS)


def test_same_seed_gives_identical_folders_and_another_seed_other_weights(tmp_path):
    first = save_pipeline("tiny-sdxl", tmp_path / "first", seed=1)
    second = save_pipeline("tiny-sdxl", tmp_path / "second", seed=1)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    for path in files:
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    other = build_pipeline("tiny-sdxl", seed=2)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = load_file(next((first / name).glob("*.safetensors")))
        drawn = getattr(other, name).state_dict()
        assert any(not torch.equal(weights[key], drawn[key]) for key in weights), name


def test_seeding_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pipeline("tiny-sd15", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("preset", sorted(PIPELINE_CLASSES))
def test_vae_downsamples_by_eight_like_the_real_one(preset):
    pipeline = build_pipeline(preset)
    assert pipeline.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def _pipeline(preset, real_size):
    return real_size[preset] if preset in real_size else build_pipeline(preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_text_encoder_configs_match_their_tokenizers(preset, real_size):
    pipeline = _pipeline(preset, real_size)
    pairs = [
        (getattr(pipeline, f"tokenizer{suffix}", None), getattr(pipeline, f"text_encoder{suffix}", None))
        for suffix in ("", "_2")
    ]
    pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]  # a refiner has one
    assert pairs
    for tokenizer, encoder in pairs:
        config = encoder.config
        # CLIP's pooled output is read at the first eos_token_id: it must be the tokenizer's
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.bos_token_id == tokenizer.bos_token_id
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.vocab_size >= len(tokenizer)
        assert config.max_position_embeddings == tokenizer.model_max_length == 77
    if preset in real_size:
        assert all(encoder.config.vocab_size == 49408 for _, encoder in pairs)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "sdxl-real-arch"])
def test_sdxl_unet_sizes_follow_from_the_text_encoders(preset, real_size):
    pipeline = _pipeline(preset, real_size)
    unet, first, second = pipeline.unet.config, pipeline.text_encoder.config, pipeline.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == first.hidden_size + second.hidden_size
    # six micro-conditioning numbers (original size, crop, target size), plus the pooled embedding
    assert (
        unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + second.projection_dim
    )


def test_schedulers_are_the_ones_the_real_checkpoints_ship():
    sd15 = build_pipeline("tiny-sd15").scheduler
    assert type(sd15).__name__ == "PNDMScheduler"
    assert sd15.config.skip_prk_steps and sd15.config.steps_offset == 1
    assert sd15.config.beta_schedule == "scaled_linear" and not sd15.config.set_alpha_to_one
    sdxl = build_pipeline("tiny-sdxl").scheduler
    assert type(sdxl).__name__ == "EulerDiscreteScheduler"
    assert sdxl.config.timestep_spacing == "leading" and not sdxl.config.use_karras_sigmas


# Published parameter counts of SD 1.5 and SDXL base 1.0 (UNet, VAE, CLIP ViT-L, OpenCLIP bigG).
PUBLISHED = {
    "sd15-real-arch": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl-real-arch": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.mark.parametrize("preset", REAL_SIZE)
def test_real_size_presets_have_the_published_parameter_counts(preset, real_size):
    pipeline = real_size[preset]
    counts = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in PUBLISHED[preset]
    }
    assert counts == PUBLISHED[preset]
    assert pipeline.vae_scale_factor == 8
    assert pipeline.unet.device.type == "meta"


def test_fp16_saves_half_precision_weights(tmp_path):
    directory = save_pipeline("tiny-sd15", tmp_path / "fp16", dtype=torch.float16)
    for path in directory.rglob("*.safetensors"):
        assert {tensor.dtype for tensor in load_file(path).values()} == {torch.float16}, path


def test_command_line_saves_the_preset_and_prints_where(tmp_path, capsys):
    out = tmp_path / "made"
    assert main(["tiny-sd15", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "seed 3" in (out / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["no-such-preset", str(tmp_path / "other")])


def test_presets_are_described():
    assert all(preset.description for preset in PRESETS.values())
