"""Stable Diffusion pipelines with the real architectures and random weights, built offline.

Nothing here downloads anything: the CLIP tokenizer is made from scratch too (the byte-level
alphabet plus BPE merges trained on a small English word list, so common words are one token).
The pipelines are saved in diffusers format with safetensors, so the project's real loading code
(`from_pretrained(..., local_files_only=True)`) runs on them in tests, benchmarks and demos.
Their images are noise: they prove the mechanics, not the quality.

    script/make-random-pipeline tiny-sd15 .cache/tiny-sd15
    script/make-random-pipeline sdxl-real-arch /tmp/sdxl --fp16   # real size: for GPU benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77
REAL_VOCAB_SIZE = 49408  # CLIP's vocabulary size, for the real-size text encoders

WORDS = """
a an the of on in with and at to by for from over under near behind big small large tiny
red green blue yellow orange purple pink white black gray grey brown cyan magenta gold silver
circle square triangle star ring cross heart rectangle oval diamond hexagon line dot shape
background foreground photo picture painting drawing render portrait landscape image
cat dog horse astronaut mars moon sun sky sea mountain tree flower house city street car
riding standing sitting flying light dark bright colorful detailed high quality blurry
""".split()

# The scheduler configs the real checkpoints ship (SD 1.5, SD 2.1 and SDXL base 1.0).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SD2_SCHEDULER = {  # DDIM, as SD 2.1 ships it; the 768-v models differ only in prediction_type
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: one printable character per byte value (as in GPT-2/CLIP)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(code) for code in characters]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word one token: the most frequent adjacent pair is merged first,
    ties broken alphabetically, so the result depends on nothing but the word list (the `tokenizers`
    trainer breaks ties in hash order, which changes from one process to the next)."""
    corpus = [(*word[:-1], f"{word[-1]}</w>") for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge(symbols, best) for symbols in corpus]


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A CLIP BPE vocabulary laid out as CLIP's: the 256 byte symbols, the same with `</w>`, the
    merged symbols in merge order, then `<|startoftext|>` and `<|endoftext|>` last."""
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(f"{char}</w>" for char in alphabet)]:
        vocab[symbol] = len(vocab)
    merges = _learn_merges(WORDS)
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return vocab, tuple(merges)


def make_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """An offline CLIP tokenizer (77 tokens; SDXL's second tokenizer pads with "!")."""
    vocab, merges = _vocab_and_merges()
    # transformers 5's CLIPTokenizer is the `tokenizers`-backed one: it takes the vocabulary and
    # the merges (as pairs) directly, and saves them as tokenizer.json
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS, pad_token=pad_token
    )


def write_vocab_files(tokenizer_dir: Path) -> None:
    """Add vocab.json and merges.txt, as CLIP checkpoints ship them, next to the saved
    tokenizer.json (transformers 5 writes only that; transformers 4's slow CLIPTokenizer needs these)."""
    vocab, merges = _vocab_and_merges()
    tokenizer_dir = Path(tokenizer_dir)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def text_config(tokenizer: CLIPTokenizer, vocab_size: int | None, **sizes: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(tokenizer.pad_token),
        **sizes,
    )


def vae_model(block_out_channels: tuple[int, ...], norm_num_groups: int, **extra: Any) -> AutoencoderKL:
    """Four blocks, so the VAE downsamples by 8 as the real one does."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=block_out_channels,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        **extra,
    )


_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
_TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
)


def _tiny_vae(**extra: Any) -> AutoencoderKL:
    return vae_model((8, 16, 32, 32), norm_num_groups=8, sample_size=128, **extra)


def _safety_checker(image_size: int, projection_dim: int, **vision: Any) -> StableDiffusionSafetyChecker:
    """SD 1.x's safety checker (a CLIP vision tower scored against concept embeddings).

    Built fresh, every concept threshold is 1 and a cosine never exceeds it: nothing is flagged
    until a test lowers `concept_embeds_weights`.
    """
    vision_config = CLIPVisionConfig(image_size=image_size, projection_dim=projection_dim, **vision)
    config = CLIPConfig(
        text_config={"projection_dim": projection_dim},
        vision_config=vision_config.to_dict(),
        projection_dim=projection_dim,
    )
    return StableDiffusionSafetyChecker(config)


def _feature_extractor(image_size: int) -> CLIPImageProcessor:
    """CLIP's preprocessing (resize, centre crop, normalise) at `image_size`."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


@dataclass(frozen=True)
class Preset:
    description: str
    build: Callable[[], DiffusionPipeline]


def _tiny_sd15() -> DiffusionPipeline:
    tokenizer = make_tokenizer()
    text = text_config(tokenizer, None, **_TINY_CLIP)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=32, attention_head_dim=8),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        # Built last, so the other modules draw the same random weights as before it was added.
        safety_checker=_safety_checker(32, 32, patch_size=8, **_TINY_CLIP),
        feature_extractor=_feature_extractor(32),
        requires_safety_checker=True,
    )


def _tiny_xl_unet(cross_attention_dim: int, micro_conditions: int, pooled: int) -> UNet2DConditionModel:
    """A tiny SDXL-style UNet: `text_time` embeds `micro_conditions` numbers (the base's six: sizes
    and crop; the refiner's five: with the aesthetic score instead of the target size) and the
    pooled text embedding (`pooled` wide)."""
    time_embed_dim = 8
    return UNet2DConditionModel(
        **_TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=micro_conditions * time_embed_dim + pooled,
    )


def _tiny_sdxl(second_width: int = 32) -> DiffusionPipeline:
    """SDXL at tiny size. `second_width`: the second text encoder's width (tiny-sdxl: 32, as the
    first; tiny-sdxl-distinct-encoders: 64, as the real ones differ: CLIP-L 768, OpenCLIP bigG
    1280, and diffusers' single-file loader tells SDXL's two encoders apart by width alone)."""
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer(pad_token="!")
    first = dict(_TINY_CLIP, projection_dim=32)
    second = dict(first, hidden_size=second_width)
    return StableDiffusionXLPipeline(
        # both text encoders' states, concatenated; six micro-conditioning numbers (sizes, crop)
        unet=_tiny_xl_unet(first["hidden_size"] + second["hidden_size"], 6, second["projection_dim"]),
        vae=_tiny_vae(force_upcast=True),
        text_encoder=CLIPTextModel(text_config(tokenizer, None, **first)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, None, **second)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )


def _tiny_sd2(prediction_type: str = "epsilon") -> DiffusionPipeline:
    """SD 2.x at tiny size: a UNet attending to 1024-wide text states with linear projections, and
    an OpenCLIP-like text encoder. It has to be 1024 wide (OpenCLIP ViT-H's width: the project and
    diffusers tell SD 2.x by it), so it is the one big part; SD 2.x ships no safety checker."""
    tokenizer = make_tokenizer(pad_token="!")  # SD 2.x's tokenizer pads with "!"
    open_clip = dict(hidden_size=1024, intermediate_size=64, num_attention_heads=16, num_hidden_layers=2)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            **_TINY_UNET, cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True
        ),
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(text_config(tokenizer, None, **open_clip, hidden_act="gelu")),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(dict(SD2_SCHEDULER, prediction_type=prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _with_inpainting_unet(pipeline: DiffusionPipeline, pipeline_class: type) -> DiffusionPipeline:
    """`pipeline` as an inpainting one: its UNet's architecture with 9 input channels (latents,
    mask, masked-image latents) and fresh random weights, every other component as it is."""
    config = {key: value for key, value in pipeline.unet.config.items() if not key.startswith("_")}
    unet = UNet2DConditionModel.from_config(dict(config, in_channels=9))
    options = {key: value for key, value in pipeline.config.items() if key == "requires_safety_checker"}
    return pipeline_class(**dict(pipeline.components, unet=unet), **options)


def _tiny_sd15_inpainting() -> DiffusionPipeline:
    return _with_inpainting_unet(_tiny_sd15(), StableDiffusionInpaintPipeline)


def _tiny_sdxl_refiner() -> DiffusionPipeline:
    """An SDXL refiner for tiny-sdxl: an image-to-image pipeline whose UNet reads only the second
    text encoder's states (32 wide here, 1280 in the real one) and embeds five micro-conditioning
    numbers (sizes, crop, aesthetic score) where the base embeds six. Its own VAE and text encoder
    are saved as the real repository has them; the project loads only its UNet."""
    tokenizer_2 = make_tokenizer(pad_token="!")
    text = dict(_TINY_CLIP, projection_dim=32)
    return StableDiffusionXLImg2ImgPipeline(
        unet=_tiny_xl_unet(text["hidden_size"], 5, text["projection_dim"]),
        vae=_tiny_vae(force_upcast=True),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(text_config(tokenizer_2, None, **text)),
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def _tiny_sdxl_distinct_encoders() -> DiffusionPipeline:
    return _tiny_sdxl(second_width=64)


def _tiny_sdxl_inpainting() -> DiffusionPipeline:
    return _with_inpainting_unet(_tiny_sdxl_distinct_encoders(), StableDiffusionXLInpaintPipeline)


def _clip_vit_l(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return text_config(
        tokenizer,
        REAL_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _sd15_real_arch() -> DiffusionPipeline:
    tokenizer = make_tokenizer()
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        vae=vae_model((128, 256, 512, 512), norm_num_groups=32, layers_per_block=2, sample_size=512),
        text_encoder=CLIPTextModel(_clip_vit_l(tokenizer)),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        # CLIP ViT-L/14 at 224 pixels, as in the checkpoint's safety_checker folder.
        safety_checker=_safety_checker(
            224,
            768,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            hidden_act="quick_gelu",
        ),
        feature_extractor=_feature_extractor(224),
        requires_safety_checker=True,
    )


def _sdxl_real_arch() -> DiffusionPipeline:
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer(pad_token="!")
    open_clip_big_g = text_config(
        tokenizer_2,
        REAL_VOCAB_SIZE,
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        projection_dim=1280,
        hidden_act="gelu",
    )
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        vae=vae_model(
            (128, 256, 512, 512),
            norm_num_groups=32,
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        text_encoder=CLIPTextModel(_clip_vit_l(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(open_clip_big_g),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )


PRESETS: dict[str, Preset] = {
    "tiny-sd15": Preset(
        "SD 1.x architecture, tiny (UNet 32/64 channels, 2-layer CLIP, safety checker)", _tiny_sd15
    ),
    "tiny-sdxl": Preset("SDXL architecture, tiny (two 2-layer CLIP encoders, text_time UNet)", _tiny_sdxl),
    "tiny-sd2": Preset(
        "SD 2.x architecture, tiny (1024-wide 2-layer OpenCLIP-like encoder, linear-projection UNet)",
        _tiny_sd2,
    ),
    "tiny-sd2-v": Preset(
        "SD 2.x 768-v style, tiny: tiny-sd2 with a v-prediction scheduler", partial(_tiny_sd2, "v_prediction")
    ),
    "tiny-sd15-inpainting": Preset(
        "SD 1.x inpainting, tiny: tiny-sd15 with a 9-channel UNet", _tiny_sd15_inpainting
    ),
    "tiny-sdxl-distinct-encoders": Preset(
        "SDXL architecture, tiny, its text encoders 32 and 64 wide (so its single file loads in diffusers)",
        _tiny_sdxl_distinct_encoders,
    ),
    "tiny-sdxl-refiner": Preset(
        "SDXL refiner, tiny: image-to-image UNet on tiny-sdxl's second text encoder (5 micro-conditions)",
        _tiny_sdxl_refiner,
    ),
    "tiny-sdxl-inpainting": Preset(
        "SDXL inpainting, tiny: tiny-sdxl-distinct-encoders with a 9-channel UNet", _tiny_sdxl_inpainting
    ),
    "sd15-real-arch": Preset(
        "SD 1.5 UNet/VAE/CLIP ViT-L and safety checker at full size (~1.4 B parameters)", _sd15_real_arch
    ),
    "sdxl-real-arch": Preset(
        "SDXL base 1.0 UNet/VAE/CLIP-L/bigG at full size (~3.5 B parameters)", _sdxl_real_arch
    ),
}

README = """# Random-weight pipeline: {preset}

{description}, built by `sdcog_tools.random_pipelines` with seed {seed}.
The weights are random: **its images are noise**. It exists to exercise loading and serving
code (and, at real size, to measure speed) without downloading a model.
"""


def build_pipeline(preset: str, seed: int = 0) -> DiffusionPipeline:
    """The preset's pipeline with weights drawn from `seed` (the same seed gives the same weights)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PRESETS[preset].build()


def save_pipeline(preset: str, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build `preset` and save it to `out_dir` in diffusers format (safetensors only)."""
    out_dir = Path(out_dir)
    pipeline = build_pipeline(preset, seed)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipeline, name, None) is not None:
            write_vocab_files(out_dir / name)
    description = PRESETS[preset].description
    (out_dir / "README.md").write_text(README.format(preset=preset, description=description, seed=seed))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/make-random-pipeline",
        description=__doc__.split("\n\n")[0],
        epilog="presets: " + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()),
    )
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp16", action="store_true", help="save in float16 (real-size presets)")
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.fp16 else torch.float32
    print(save_pipeline(args.preset, args.out_dir, seed=args.seed, dtype=dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def random_controlnet(
    unet: UNet2DConditionModel,
    seed: int = 0,
    conditioning: tuple[int, ...] = (16, 32, 96, 256),
    **overrides: Any,
) -> ControlNetModel:
    """A ControlNet for `unet` with random weights that steer: diffusers' `from_unet` architecture
    (`overrides` change it, e.g. fewer transformer layers for a small one), its zero convolutions
    (which make a fresh ControlNet a no-op) drawn at random too."""
    torch.manual_seed(seed)
    if overrides:
        config = dict(
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning).config
        )
        config.update(overrides)
        controlnet = ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    else:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for module in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(module.weight, std=0.05)
    return controlnet.eval()


def save_controlnet(pipeline_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A random ControlNet for the pipeline in `pipeline_dir`, saved in diffusers format in `out_dir`."""
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_dir) / "unet")
    random_controlnet(unet, seed).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def save_depth_estimator(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Depth Anything (transformers' architecture of the depth preprocessor's weights, a
    4-layer DINOv2 backbone) with random weights and its image processor, saved in `out_dir`."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(out_dir)
    processor = DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
    )
    processor.save_pretrained(out_dir)
    return Path(out_dir)
