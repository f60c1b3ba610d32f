"""What differs between the Stable Diffusion model families, in one place.

SD 1.x, SD 2.x (base and 768 v-prediction) and SDXL load through the same code; only the values
here differ. A loaded pipeline is matched to its family from its `model_index.json` and component
configs, so a fork serving another checkpoint of a known family needs no code change.

The native size is not a family value: SD 2.x has 512 (base) and 768 (v) models, so it is read
from the weights themselves (UNet sample size x VAE scale factor; see `Engine.limits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFamily:
    key: str
    label: str
    pipeline_class: str
    """Name of the diffusers text-to-image pipeline class (the one the weights load with)."""
    img2img_pipeline_class: str
    inpaint_pipeline_class: str
    controlnet_pipeline_classes: tuple[str, str, str]
    """The same three modes steered by ControlNets: text-to-image, image-to-image, inpainting."""
    pixel_budget: int
    """Upper bound on width x height x num_outputs per request, so a request that would run out of
    GPU memory (on an 80 GB card, before VAE tiling) is refused before any work starts."""
    default_steps: int
    default_guidance: float


SD1 = ModelFamily(
    key="sd1",
    label="Stable Diffusion 1.x",
    pipeline_class="StableDiffusionPipeline",
    img2img_pipeline_class="StableDiffusionImg2ImgPipeline",
    inpaint_pipeline_class="StableDiffusionInpaintPipeline",
    controlnet_pipeline_classes=(
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
    ),
    pixel_budget=4 * 1024 * 1024,
    default_steps=30,
    default_guidance=7.5,
)
SD2 = ModelFamily(
    key="sd2",
    label="Stable Diffusion 2.x",
    pipeline_class="StableDiffusionPipeline",
    img2img_pipeline_class="StableDiffusionImg2ImgPipeline",
    inpaint_pipeline_class="StableDiffusionInpaintPipeline",
    controlnet_pipeline_classes=(
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
    ),
    pixel_budget=4 * 1024 * 1024,
    default_steps=30,
    default_guidance=7.5,
)
SDXL = ModelFamily(
    key="sdxl",
    label="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    img2img_pipeline_class="StableDiffusionXLImg2ImgPipeline",
    inpaint_pipeline_class="StableDiffusionXLInpaintPipeline",
    controlnet_pipeline_classes=(
        "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
    ),
    pixel_budget=4 * 1536 * 1536,
    default_steps=30,
    default_guidance=7.0,
)

FAMILIES: dict[str, ModelFamily] = {family.key: family for family in (SD1, SD2, SDXL)}

# OpenCLIP ViT-H (SD 2.x) has 1024-wide hidden states; CLIP ViT-L (SD 1.x) has 768.
_SD2_CROSS_ATTENTION_DIM = 1024


class UnsupportedModelError(ValueError):
    """The weights directory holds a pipeline this project does not serve."""


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def unet_config(weights_dir: Path) -> dict[str, Any]:
    return _read_json(weights_dir / "unet" / "config.json")


def detect_family(weights_dir: Path) -> ModelFamily:
    """Tell the family of a diffusers pipeline directory from its configs, without loading weights."""
    model_index = _read_json(weights_dir / "model_index.json")
    class_name = model_index.get("_class_name", "")
    if class_name.startswith("StableDiffusionXL"):
        return SDXL
    if class_name.startswith("StableDiffusion") and "XL" not in class_name:
        if unet_config(weights_dir).get("cross_attention_dim") == _SD2_CROSS_ATTENTION_DIM:
            return SD2
        return SD1
    raise UnsupportedModelError(
        f"{weights_dir}/model_index.json names the pipeline {class_name!r}; this model serves "
        "Stable Diffusion 1.x, 2.x and XL pipelines in diffusers format "
        "(StableDiffusionPipeline or StableDiffusionXLPipeline)."
    )
