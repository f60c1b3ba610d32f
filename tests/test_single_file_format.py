"""Single-file checkpoints written from the random pipelines are in the original (LDM) layout, and
diffusers' own single-file loader reads them back as exactly the diffusers-format weights."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file

from sdcog_tools.random_pipelines import build_pipeline, save_pipeline
from sdcog_tools.single_file_checkpoints import (
    SD1_CLIP_PREFIX,
    SDXL_EMBEDDERS_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_to_open_clip,
    hf_clip,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)

PIPELINE_CLASSES = {
    "tiny-sd15": StableDiffusionPipeline,
    "tiny-sd2": StableDiffusionPipeline,
    "tiny-sd2-v": StableDiffusionPipeline,
    "tiny-sdxl": StableDiffusionXLPipeline,
    "tiny-sdxl-distinct-encoders": StableDiffusionXLPipeline,
    "tiny-sd15-inpainting": StableDiffusionInpaintPipeline,
    "tiny-sdxl-inpainting": StableDiffusionXLInpaintPipeline,
}
ROUND_TRIP = [preset for preset in PIPELINE_CLASSES if preset != "tiny-sd2-v"]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Keys every SD checkpoint has, in every family (the tiny VAE has 4 blocks as the real one, but one
# resnet a block where the real one has 2)
COMMON_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.2.0.op.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.norm1.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.1.conv2.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.quant_conv.weight",
]
FAMILY_KEYS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
    "sd2": [
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.text_projection",
    ],
    "sdxl": [
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
        "conditioner.embedders.1.model.text_projection",
    ],
}
FAMILY_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.text_model.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
}


def family(preset: str) -> str:
    return "sdxl" if "sdxl" in preset else "sd2" if "sd2" in preset else "sd1"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """Each preset's diffusers folder, saved once (on first use) for the module."""
    root = tmp_path_factory.mktemp("single-file-pipelines")
    saved = {}

    def saved_pipeline(preset):
        if preset not in saved:
            saved[preset] = save_pipeline(preset, root / preset)
        return saved[preset]

    return saved_pipeline


@pytest.fixture(scope="module")
def single_file(pipeline_dir, tmp_path_factory):
    """Each preset's single file, written once (on first use) for the module."""
    root = tmp_path_factory.mktemp("single-files")
    written = {}

    def written_file(preset):
        if preset not in written:
            written[preset] = save_single_file(pipeline_dir(preset), root / f"{preset}.safetensors")
        return written[preset]

    return written_file


def assert_same_weights(expected, loaded, name):
    expected, loaded = expected.state_dict(), loaded.state_dict()
    assert expected.keys() == loaded.keys(), name
    different = [key for key in expected if not torch.equal(expected[key], loaded[key])]
    assert not different, f"{name}: {different[:5]}"


@pytest.mark.parametrize("preset", ROUND_TRIP)
def test_diffusers_loads_the_single_file_as_the_same_weights(preset, pipeline_dir, single_file):
    directory = pipeline_dir(preset)
    pipeline_class = PIPELINE_CLASSES[preset]
    loaded = pipeline_class.from_single_file(
        str(single_file(preset)), config=str(directory), local_files_only=True
    )
    expected = DiffusionPipeline.from_pretrained(directory, local_files_only=True)
    assert type(loaded) is type(expected) is pipeline_class
    names = [name for name in COMPONENTS if getattr(expected, name, None) is not None]
    if preset == "tiny-sdxl":
        # Both its text encoders are 32 wide, and diffusers tells SDXL's apart by width only:
        # from_single_file gives text_encoder_2 the first one's weights. Its converter reads the
        # file's OpenCLIP part right (next test); tiny-sdxl-distinct-encoders loads whole.
        names.remove("text_encoder_2")
    assert len(names) >= 3
    for name in names:
        assert_same_weights(getattr(expected, name), getattr(loaded, name), name)


def test_tiny_sdxl_second_encoder_converts_back_with_diffusers_converter(pipeline_dir, single_file):
    checkpoint = load_file(single_file("tiny-sdxl"))
    expected = DiffusionPipeline.from_pretrained(pipeline_dir("tiny-sdxl"), local_files_only=True)
    encoder = expected.text_encoder_2
    converted = convert_open_clip_checkpoint(encoder, checkpoint, prefix="conditioner.embedders.1.model.")
    state = encoder.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[key], state[key]) for key in state)


@pytest.mark.parametrize("preset", PIPELINE_CLASSES)
def test_file_has_the_original_checkpoints_keys(preset, pipeline_dir, single_file):
    tensors = load_file(single_file(preset))
    kind = family(preset)
    for key in COMMON_KEYS + FAMILY_KEYS[kind]:
        assert key in tensors, key
    prefixes = (UNET_PREFIX, VAE_PREFIX, *FAMILY_PREFIXES[kind])
    assert all(key.startswith(prefixes) for key in tensors)
    assert not any("safety" in key or key.startswith("text_model.") for key in tensors)
    channels = tensors["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    assert channels == (9 if "inpainting" in preset else 4)
    # the VAE's attention projections are 1x1 convolutions in the original
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl-distinct-encoders"])
def test_open_clip_layout(preset, pipeline_dir, single_file):
    directory = pipeline_dir(preset)
    tensors = load_file(single_file(preset))
    name = "text_encoder_2" if family(preset) == "sdxl" else "text_encoder"
    config = json.loads((directory / name / "config.json").read_text())
    weights = load_file(directory / name / "model.safetensors")
    weights = {key.removeprefix("text_model."): tensor for key, tensor in weights.items()}
    prefix = f"{SDXL_EMBEDDERS_PREFIX}1.model." if name == "text_encoder_2" else "cond_stage_model.model."
    layer = "encoder.layers.1.self_attn."
    in_proj = torch.cat([weights[f"{layer}{part}_proj.weight"] for part in "qkv"])
    assert torch.equal(tensors[f"{prefix}transformer.resblocks.1.attn.in_proj_weight"], in_proj)
    width = config["hidden_size"]
    assert tensors[f"{prefix}positional_embedding"].shape == (77, width)
    resblocks = f"{prefix}transformer.resblocks."
    blocks = {key.removeprefix(resblocks).split(".")[0] for key in tensors if key.startswith(resblocks)}
    if name == "text_encoder_2":
        # OpenCLIP applies x @ text_projection: [width, projection_dim], the Linear's weight transposed
        assert torch.equal(tensors[f"{prefix}text_projection"], weights["text_projection.weight"].T)
        assert tensors[f"{prefix}text_projection"].shape == (64, 32)
        assert len(blocks) == config["num_hidden_layers"]
    else:
        # SD 2.x: the file has OpenCLIP's last block too, which diffusers' encoder drops (24 for 23)
        assert len(blocks) == config["num_hidden_layers"] + 1
        assert tensors[f"{prefix}text_projection"].shape == (width, width)


def test_metadata_and_extra_tensors_are_written(pipeline_dir, tmp_path):
    directory = pipeline_dir("tiny-sd2-v")
    metadata = {"modelspec.architecture": "stable-diffusion-v2-768-v", "note": "random weights"}
    path = save_single_file(
        directory, tmp_path / "v.safetensors", metadata=metadata, extra_tensors={"v_pred": torch.tensor([])}
    )
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == metadata
        assert handle.get_tensor("v_pred").shape == (0,)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(directory), local_files_only=True)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="replace"):
        clash = {f"{UNET_PREFIX}out.2.bias": torch.ones(4)}
        save_single_file(directory, tmp_path / "clash.safetensors", extra_tensors=clash)


@pytest.fixture(scope="module")
def real_size():
    """The real-size presets on the meta device: the full-size shapes, no weights."""
    with init_empty_weights():
        return {preset: build_pipeline(preset) for preset in ("sd15-real-arch", "sdxl-real-arch")}


@pytest.mark.parametrize(
    "preset, unet_keys, model_type", [("sd15-real-arch", 686, "v1"), ("sdxl-real-arch", 1680, "xl_base")]
)
def test_full_size_mapping_is_the_real_checkpoints(preset, unet_keys, model_type, real_size):
    """At full size the names are the real checkpoints' (SD 1.5 and SDXL's UNets have 686 and 1680
    tensors), diffusers' converters map them back onto every weight, and diffusers recognises the
    family from them as it does the real files."""
    pipeline = real_size[preset]
    unet, vae = pipeline.unet, pipeline.vae
    ldm_unet = {
        UNET_PREFIX + key: value for key, value in unet_to_ldm(unet.state_dict(), unet.config).items()
    }
    ldm_vae = {VAE_PREFIX + key: value for key, value in vae_to_ldm(vae.state_dict(), vae.config).items()}
    assert len(ldm_unet) == unet_keys
    for model, back in [
        (unet, convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))),
    ]:
        state = model.state_dict()
        assert back.keys() == state.keys()
        assert all(back[key].shape == state[key].shape for key in state)
    if preset == "sd15-real-arch":
        text = {
            SD1_CLIP_PREFIX + key: value for key, value in hf_clip(pipeline.text_encoder.state_dict()).items()
        }
    else:
        bigg = pipeline.text_encoder_2
        open_clip = clip_to_open_clip(bigg.state_dict(), bigg.config.to_dict(), bigg.text_projection.weight)
        text = {f"{SDXL_EMBEDDERS_PREFIX}1.model.{key}": value for key, value in open_clip.items()}
    assert infer_diffusers_model_type({**ldm_unet, **ldm_vae, **text}) == model_type
