"""The SDXL refiner, loaded beside an SDXL base and sharing its modules.

Stability's refiner is an image-to-image SDXL pipeline whose UNet was trained on the last,
low-noise part of the schedule; it reads only the second text encoder (OpenCLIP bigG) and uses
the same VAE as the base. So only its UNet is loaded: the VAE, the second text encoder and its
tokenizer are the base's own objects (no second copy in memory), which is also why the refiner's
folder needs no weights but its UNet's (`script/download-weights --refiner` fetches just that).

Where: `REFINER_WEIGHTS` (a diffusers folder of `StableDiffusionXLImg2ImgPipeline`), else
`refiner/` in the project (baked into the image), else none (`refine` is then refused, saying so).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from sdcog.model.families import SDXL, ModelFamily
from sdcog.model.weights import PROJECT_ROOT, WeightsError
from sdcog.resolve.request import NO_REFINER_LOADED

log = logging.getLogger(__name__)

REFINER_ENV = "REFINER_WEIGHTS"
BAKED_REFINER_DIR = PROJECT_ROOT / "refiner"
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"


@dataclass
class Refiner:
    pipeline: StableDiffusionXLImg2ImgPipeline
    directory: Path


def refiner_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The refiner folder to load, or None when there is none."""
    configured = environ.get(REFINER_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not (path / "model_index.json").is_file():
            raise WeightsError(
                f"{REFINER_ENV}={configured} is not a diffusers refiner folder (no model_index.json)"
            )
        return path
    return BAKED_REFINER_DIR if (BAKED_REFINER_DIR / "model_index.json").is_file() else None


def load_refiner(
    base: object,
    family: ModelFamily,
    dtype: torch.dtype,
    device: torch.device,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Refiner | None, str | None]:
    """The refiner around `base`'s VAE and second text encoder, or None and why (for `refine`'s
    refusal). A refiner whose UNet does not fit the base's text encoder is refused at setup."""
    directory = refiner_dir(environ)
    if directory is None:
        return None, NO_REFINER_LOADED
    if family is not SDXL:
        log.warning("setup: a refiner is in %s, but the model is %s: not loaded", directory, family.label)
        return None, f"the refiner is for SDXL, and this model is {family.label}"
    index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") != REFINER_PIPELINE:
        raise WeightsError(
            f"{directory / 'model_index.json'} names {index.get('_class_name')!r}, not an SDXL refiner "
            f"({REFINER_PIPELINE})"
        )
    unet = UNet2DConditionModel.from_pretrained(
        directory / "unet", local_files_only=True, use_safetensors=True, torch_dtype=dtype
    ).to(device)
    width = base.text_encoder_2.config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise WeightsError(
            f"{directory / 'unet'} attends to {unet.config.cross_attention_dim}-wide text states, but "
            f"the base's second text encoder is {width} wide: not a refiner for this base"
        )
    scheduler_class = type(base.scheduler)
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=scheduler_class.from_pretrained(directory / "scheduler"),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    log.info(
        "setup: the SDXL refiner from %s: its UNet (%.2f B parameters); VAE and text encoder shared",
        directory,
        parameters / 1e9,
    )
    return Refiner(pipeline, directory), None
