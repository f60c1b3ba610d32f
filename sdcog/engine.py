"""The loaded model: one diffusers pipeline, loaded once, run per request.

Per request the engine builds a lightweight pipeline object of the request's mode (text-to-image,
image-to-image, inpainting) around the shared, already loaded components (UNet, VAE, text
encoders, tokenizers) with a fresh scheduler, so no request changes state another one sees, and
no weights are copied.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from PIL import Image

from sdcog.families import ModelFamily, detect_family
from sdcog.images import paste_back
from sdcog.request import IMAGE_TO_IMAGE, INPAINT, TEXT_TO_IMAGE, GenerationRequest, ModelLimits
from sdcog.schedulers import build_scheduler
from sdcog.weights import WeightsInfo, inspect_weights

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on the GPU; float32 on the CPU, where half precision is slow or unsupported."""
    return torch.float16 if device.type == "cuda" else torch.float32


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@dataclass
class Engine:
    pipeline: DiffusionPipeline
    family: ModelFamily
    weights: WeightsInfo
    device: torch.device

    @classmethod
    def load(cls, directory: Path, device: torch.device | None = None) -> Engine:
        """Load the pipeline in `directory` offline, onto `device` (the GPU when there is one)."""
        started = time.perf_counter()
        # Per-component progress bars only clutter the setup logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        weights = inspect_weights(directory)
        family = detect_family(directory)
        device = device or default_device()
        pipeline_class = getattr(diffusers, family.pipeline_class)
        pipeline = pipeline_class.from_pretrained(
            directory,
            local_files_only=True,
            use_safetensors=True,
            dtype=default_dtype(device),
            variant=weights.variant,
        )
        pipeline.to(device)
        engine = cls(pipeline=pipeline, family=family, weights=weights, device=device)
        limits = engine.limits
        log.info(
            "loaded %s (%s, native %dx%d) from %s on %s in %.1f s",
            weights.name,
            family.label,
            limits.native_width,
            limits.native_height,
            directory,
            device,
            time.perf_counter() - started,
        )
        return engine

    @property
    def limits(self) -> ModelLimits:
        sample_size = self.pipeline.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        scale = self.pipeline.vae_scale_factor
        return ModelLimits(family=self.family, native_width=width * scale, native_height=height * scale)

    def _pipeline_class(self, mode: str) -> type[DiffusionPipeline]:
        family = self.family
        name = {
            TEXT_TO_IMAGE: family.pipeline_class,
            IMAGE_TO_IMAGE: family.img2img_pipeline_class,
            INPAINT: family.inpaint_pipeline_class,
        }[mode]
        return getattr(diffusers, name)

    def _pipeline_for(self, request: GenerationRequest) -> DiffusionPipeline:
        """A pipeline of the request's mode around the shared components, with its own scheduler.

        Image-to-image and inpainting reuse the loaded modules: no second copy of any weights.
        """
        loaded = self.pipeline
        pipeline_class = self._pipeline_class(request.mode)
        parameters = inspect.signature(pipeline_class.__init__).parameters
        components = {name: module for name, module in loaded.components.items() if name in parameters}
        components["scheduler"] = build_scheduler(request.scheduler, loaded.scheduler.config)
        # Constructor settings that are config values, not modules (requires_safety_checker,
        # force_zeros_for_empty_prompt, ...), carried over from the loaded pipeline.
        settings = {
            name: loaded.config[name]
            for name in parameters
            if name not in components and name in loaded.config
        }
        per_request = pipeline_class(**components, **settings)
        per_request.set_progress_bar_config(disable=True)
        return per_request

    def generate(self, request: GenerationRequest) -> list[Image.Image]:
        """Run one request: text-to-image, image-to-image or inpainting, by `request.mode`."""
        pipeline = self._pipeline_for(request)
        steps_run = 0

        def count_step(_pipeline, _step, _timestep, callback_kwargs):
            nonlocal steps_run
            steps_run += 1
            return callback_kwargs

        arguments = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_outputs,
            generator=seeded_generators(request.seeds),
            output_type="pil",
            callback_on_step_end=count_step,
        )
        if request.mode != IMAGE_TO_IMAGE:
            arguments.update(width=request.width, height=request.height)
        if request.mode != TEXT_TO_IMAGE:
            arguments.update(image=request.init_image, strength=request.prompt_strength)
        if request.mode == INPAINT:
            arguments.update(mask_image=request.mask_image)
        images = list(pipeline(**arguments).images)
        if request.mode == INPAINT:
            images = [paste_back(image, request.init_image, request.mask_image) for image in images]
        if request.mode != TEXT_TO_IMAGE:
            log.info(
                "%s: prompt_strength %g ran %d of %d denoising steps",
                request.mode,
                request.prompt_strength,
                steps_run,
                request.num_inference_steps,
            )
        return images
