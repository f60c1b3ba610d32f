"""Single-file Stable Diffusion checkpoints, written from diffusers-format pipeline folders.

Checkpoints are mostly shared as one `.safetensors` file in the original (CompVis/Stability "LDM")
layout: AUTOMATIC1111 and ComfyUI save them so, and diffusers reads them with `from_single_file`.
This writes that layout from a pipeline folder in diffusers format (one that
`sdcog_tools.random_pipelines.save_pipeline` made, say), so tests can load single files offline:

    save_single_file(save_pipeline("tiny-sd15", tmp / "sd15"), tmp / "sd15.safetensors")

It does the reverse of diffusers' `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`):

- UNet under `model.diffusion_model.` (input_blocks / middle_block / output_blocks ...);
- VAE under `first_stage_model.` (encoder.down.N.block.M ..., attention as 1x1 convolutions);
- text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.` with transformers' names;
  SD 2.x's OpenCLIP under `cond_stage_model.model.`; SDXL's CLIP-L under
  `conditioner.embedders.0.transformer.` and OpenCLIP bigG under `conditioner.embedders.1.model.`.

The file holds no safety checker (the original checkpoints do not either).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_EMBEDDERS_PREFIX = "conditioner.embedders."

OPEN_CLIP_H_WIDTH = 1024
"""SD 2.x's text encoder (OpenCLIP ViT-H) is 1024 wide; SD 1.x's (CLIP ViT-L) is 768."""

# diffusers' ResnetBlock2D parts -> the original UNet ResBlock's
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers' VAE attention (linear layers) -> the original AttnBlock's (1x1 convolutions)
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_TOP_LEVEL = {
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    **{
        f"{part}.{name}": f"{part}.{name}"
        for part in ("encoder", "decoder")
        for name in ("conv_in", "conv_out")
    },
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}


def save_single_file(
    pipeline_dir: Path,
    out_file: Path,
    *,
    metadata: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the pipeline in `pipeline_dir` as one original-layout safetensors file at `out_file`.

    `metadata` goes into the header's `__metadata__`; `extra_tensors` (say `{"v_pred": torch.tensor([])}`,
    the marker some SD 2.x v-prediction files carry) are added under their own names.
    """
    tensors = ldm_state_dict(Path(pipeline_dir))
    clashes = sorted(tensors.keys() & (extra_tensors or {}).keys())
    if clashes:
        raise ValueError(f"extra_tensors would replace the model's own tensors: {clashes}")
    tensors.update(extra_tensors or {})
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, out_file, metadata=metadata)
    return out_file


_IN_THE_FILE = ("unet", "vae", "text_encoder", "text_encoder_2", "safety_checker", "feature_extractor")


def save_checkpoint_dir(
    pipeline_dir: Path,
    out_dir: Path,
    *,
    name: str = "model.safetensors",
    metadata: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The layout setup serves a checkpoint from (what `script/download-weights` writes): the
    pipeline as one file `out_dir/name`, beside its configs and tokenizers without weights (and
    without a safety checker, as download-weights leaves it out). Returns the file's path."""
    pipeline_dir, out_dir = Path(pipeline_dir), Path(out_dir)
    for path in sorted(pipeline_dir.rglob("*")):
        relative = path.relative_to(pipeline_dir)
        kept = path.is_file() and path.suffix in (".json", ".txt") and len(relative.parts) <= 2
        if kept and not (relative.parts[0] in _IN_THE_FILE[4:] and len(relative.parts) == 2):
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / relative).write_bytes(path.read_bytes())
    return save_single_file(pipeline_dir, out_dir / name, metadata=metadata, extra_tensors=extra_tensors)


def ldm_state_dict(pipeline_dir: Path) -> Tensors:
    """The pipeline's UNet, VAE and text encoder(s) under their original names, in one dict."""
    unet = unet_to_ldm(_weights(pipeline_dir / "unet"), _read_json(pipeline_dir / "unet" / "config.json"))
    vae = vae_to_ldm(_weights(pipeline_dir / "vae"), _read_json(pipeline_dir / "vae" / "config.json"))
    return {
        **_prefixed(UNET_PREFIX, unet),
        **_prefixed(VAE_PREFIX, vae),
        **text_encoders_to_ldm(pipeline_dir),
    }


# ---------------------------------------------------------------------------------------------- UNet


def unet_to_ldm(weights: Tensors, config: dict[str, Any]) -> Tensors:
    """A diffusers `UNet2DConditionModel` state dict under the original UNetModel's names."""
    return _rename(weights, {**_UNET_TOP_LEVEL, **_unet_block_names(config)}, "UNet")


def _unet_block_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module path -> original module path, for every block of a UNet with this config.

    The original numbers the encoder's modules in one list, `input_blocks`: conv_in, then per block
    `layers_per_block` (resnet, attention) pairs and a downsampler (not after the last block). The
    decoder's `output_blocks` has `layers_per_block + 1` pairs per block, the upsampler in the last
    one (after the attention when there is one)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block must be one number in the original layout, not {layers!r}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid block {config['mid_block_type']!r}")
    names: dict[str, str] = {}
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    for block, block_type in enumerate(down_types):
        first = 1 + block * (layers + 1)
        for layer in range(layers):
            names |= _unet_layer(f"down_blocks.{block}", layer, "input_blocks", first + layer, block_type)
        if block < len(down_types) - 1:
            names[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{first + layers}.0.op"
    names |= _unet_resnet("mid_block.resnets.0", "middle_block.0")
    names["mid_block.attentions.0"] = "middle_block.1"
    names |= _unet_resnet("mid_block.resnets.1", "middle_block.2")
    for block, block_type in enumerate(up_types):
        first = block * (layers + 1)
        for layer in range(layers + 1):
            names |= _unet_layer(f"up_blocks.{block}", layer, "output_blocks", first + layer, block_type)
        if block < len(up_types) - 1:
            position = 2 if _has_attention(block_type) else 1
            names[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{first + layers}.{position}.conv"
    return names


def _unet_layer(block: str, layer: int, ldm_list: str, index: int, block_type: str) -> dict[str, str]:
    names = _unet_resnet(f"{block}.resnets.{layer}", f"{ldm_list}.{index}.0")
    if _has_attention(block_type):
        names[f"{block}.attentions.{layer}"] = f"{ldm_list}.{index}.1"  # same names inside
    return names


def _unet_resnet(diffusers_path: str, ldm_path: str) -> dict[str, str]:
    return {f"{diffusers_path}.{part}": f"{ldm_path}.{ldm}" for part, ldm in _UNET_RESNET_PARTS.items()}


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


# ----------------------------------------------------------------------------------------------- VAE


def vae_to_ldm(weights: Tensors, config: dict[str, Any]) -> Tensors:
    """A diffusers `AutoencoderKL` state dict under the original AutoencoderKL's names."""
    renamed = _rename(weights, {**_VAE_TOP_LEVEL, **_vae_block_names(config)}, "VAE")
    # the original's attention projections are 1x1 convolutions: [C, C] -> [C, C, 1, 1]
    return {
        key: tensor[:, :, None, None] if ".mid.attn_1." in key and tensor.ndim == 2 else tensor
        for key, tensor in renamed.items()
    }


def _vae_block_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module path -> original module path for the VAE's blocks. The decoder has one
    resnet more per block than the encoder, and its `up` list runs the other way: from the lowest
    resolution's block up in diffusers, from the highest down in the original."""
    blocks, layers = len(config["down_block_types"]), config["layers_per_block"]
    names: dict[str, str] = {}
    for block in range(blocks):
        encoder, decoder = f"encoder.down.{block}", f"decoder.up.{blocks - 1 - block}"
        for layer in range(layers):
            names |= _vae_resnet(f"encoder.down_blocks.{block}.resnets.{layer}", f"{encoder}.block.{layer}")
        for layer in range(layers + 1):
            names |= _vae_resnet(f"decoder.up_blocks.{block}.resnets.{layer}", f"{decoder}.block.{layer}")
        names[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = f"{encoder}.downsample.conv"
        names[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"{decoder}.upsample.conv"
    for part in ("encoder", "decoder"):
        for resnet in (0, 1):
            names |= _vae_resnet(f"{part}.mid_block.resnets.{resnet}", f"{part}.mid.block_{resnet + 1}")
        for name, ldm in _VAE_ATTENTION_PARTS.items():
            names[f"{part}.mid_block.attentions.0.{name}"] = f"{part}.mid.attn_1.{ldm}"
    return names


def _vae_resnet(diffusers_path: str, ldm_path: str) -> dict[str, str]:
    """A VAE resnet keeps its parts' names (norm1, conv1 ...) but its shortcut's: `nin_shortcut`."""
    return {diffusers_path: ldm_path, f"{diffusers_path}.conv_shortcut": f"{ldm_path}.nin_shortcut"}


# ------------------------------------------------------------------------------------- text encoders


def text_encoders_to_ldm(pipeline_dir: Path) -> Tensors:
    """The text encoder(s) as the family's original checkpoints hold them, told apart by the pipeline
    class (SDXL: CLIP-L and OpenCLIP bigG) and the text encoder's width (SD 2.x: OpenCLIP ViT-H)."""
    class_name = _read_json(pipeline_dir / "model_index.json").get("_class_name", "")
    if class_name.startswith("StableDiffusionXL"):
        return _sdxl_embedders(pipeline_dir)
    if not class_name.startswith("StableDiffusion"):
        raise ValueError(f"{pipeline_dir} holds a {class_name!r}, not a Stable Diffusion pipeline")
    config = _read_json(pipeline_dir / "text_encoder" / "config.json")
    weights = _weights(pipeline_dir / "text_encoder")
    if config["hidden_size"] == OPEN_CLIP_H_WIDTH:
        # diffusers' SD 2.x encoder lacks OpenCLIP's last block (SD 2.x conditions on the one before)
        # and its projection; the original files carry both, and diffusers' converter skips them.
        dtype = next(iter(weights.values())).dtype
        projection = torch.eye(config["hidden_size"], dtype=dtype)
        open_clip = clip_to_open_clip(weights, config, projection)
        return _prefixed(SD2_OPEN_CLIP_PREFIX, open_clip | _unused_last_block(config, dtype))
    return _prefixed(SD1_CLIP_PREFIX, hf_clip(weights))


def _sdxl_embedders(pipeline_dir: Path) -> Tensors:
    """SDXL's `conditioner.embedders`, numbered in order: CLIP-L (text_encoder) then OpenCLIP bigG
    (text_encoder_2); a refiner, with only the latter, has it as embedder 0."""
    model_index = _read_json(pipeline_dir / "model_index.json")
    present = [name for name in ("text_encoder", "text_encoder_2") if (model_index.get(name) or [None])[0]]
    tensors: Tensors = {}
    for number, name in enumerate(present):
        prefix = f"{SDXL_EMBEDDERS_PREFIX}{number}."
        weights = _weights(pipeline_dir / name)
        if name == "text_encoder":
            tensors |= _prefixed(prefix + "transformer.", hf_clip(weights))
        else:
            config = _read_json(pipeline_dir / name / "config.json")
            projection = weights["text_projection.weight"]
            tensors |= _prefixed(prefix + "model.", clip_to_open_clip(weights, config, projection))
    return tensors


def hf_clip(weights: Tensors) -> Tensors:
    """transformers' CLIP text model under `text_model.` as the original files have it (transformers 5
    saves `CLIPTextModel` without that prefix); no projection (CLIP-L's is not used)."""
    return {
        f"text_model.{key.removeprefix('text_model.')}": tensor
        for key, tensor in weights.items()
        if key != "text_projection.weight" and not key.endswith("position_ids")
    }


def clip_to_open_clip(weights: Tensors, config: dict[str, Any], projection: torch.Tensor) -> Tensors:
    """A transformers CLIP text model in OpenCLIP's layout: one `in_proj` for q, k, v per block,
    the position embedding a bare tensor, and the projection as OpenCLIP applies it
    (`x @ text_projection`, so [width, projection_dim]: the transpose of the Linear's weight)."""
    clip = hf_clip(weights)
    tensors = {
        "token_embedding.weight": clip.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": clip.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": clip.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": clip.pop("text_model.final_layer_norm.bias"),
        "text_projection": projection.T.contiguous(),
    }
    for layer in range(config["num_hidden_layers"]):
        tensors |= _open_clip_block(clip, f"text_model.encoder.layers.{layer}.", layer)
    if clip:
        raise ValueError(f"text encoder weights with no OpenCLIP name: {sorted(clip)}")
    return tensors


def _open_clip_block(clip: Tensors, layer_prefix: str, layer: int) -> Tensors:
    """One encoder layer's weights (taken out of `clip`) as OpenCLIP's residual block `layer`."""

    def take(name: str) -> torch.Tensor:
        return clip.pop(layer_prefix + name)

    block = f"transformer.resblocks.{layer}."
    tensors = {block + "attn.in_proj_weight": torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])}
    tensors[block + "attn.in_proj_bias"] = torch.cat([take(f"self_attn.{p}_proj.bias") for p in "qkv"])
    renames = {
        "layer_norm1": "ln_1",
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for name, open_clip in renames.items():
        for kind in ("weight", "bias"):
            tensors[f"{block}{open_clip}.{kind}"] = take(f"{name}.{kind}")
    return tensors


def _unused_last_block(config: dict[str, Any], dtype: torch.dtype) -> Tensors:
    """OpenCLIP's last residual block, which SD 2.x does not use: zeros (an identity block), so the
    file has one block more than the diffusers encoder, as the real ones do (24 for 23)."""
    width, hidden = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (hidden, width),
        "mlp.c_fc.bias": (hidden,),
        "mlp.c_proj.weight": (width, hidden),
        "mlp.c_proj.bias": (width,),
    }
    block = f"transformer.resblocks.{config['num_hidden_layers']}."
    return {block + name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}


# ------------------------------------------------------------------------------------------- helpers


def _rename(weights: Tensors, names: dict[str, str], component: str) -> Tensors:
    """Each key's longest module path found in `names` replaced by its original name; a key with
    none is an error (the mapping would be incomplete, and the file wrong)."""
    renamed: Tensors = {}
    unmapped = []
    for key, tensor in weights.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in names:
                renamed[".".join([names[module], *parts[cut:]])] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{component} weights with no original name: {sorted(unmapped)[:10]}")
    return renamed


def _prefixed(prefix: str, tensors: Tensors) -> Tensors:
    return {prefix + key: tensor for key, tensor in tensors.items()}


def _weights(component_dir: Path) -> Tensors:
    """A component's weights from its safetensors file(s) (sharded ones too; no variants)."""
    files = sorted(path for path in component_dir.glob("*.safetensors") if path.stem.count(".") == 0)
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {component_dir} (variants such as .fp16 are not read)"
        )
    tensors: Tensors = {}
    for path in files:
        tensors |= load_file(path)
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
