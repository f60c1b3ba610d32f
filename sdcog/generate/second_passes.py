"""Running a second pass (hires fix, the SDXL refiner) on the first pass's output.

`first_pass_arguments` changes the first call so that it hands over what the second needs (its
latents; with the expert ensemble, stopping at `high_noise_frac`), and `hires_call` or
`refiner_call` builds the second call around the same shared modules: the request's own
image-to-image pipeline at the final size for a hires fix, the refiner
(sdcog/generate/refiner.py) for `refine`. The step
callback is the first call's, so progress counts both passes and a cancel stops either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sdcog.generate.batching import Job
from sdcog.resolve.request import GenerationRequest, Mode
from sdcog.resolve.schedulers import build_scheduler
from sdcog.resolve.second_passes import EXPERT_ENSEMBLE, IMAGE_UPSCALERS, LATENT_UPSCALERS, REFINE_STRENGTH

_PROMPT_ARGUMENTS = (
    "prompt",
    "negative_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "clip_skip",
)
_SHARED_ARGUMENTS = ("guidance_scale", "num_images_per_prompt", "callback_on_step_end")


def has_second_pass(request: GenerationRequest) -> bool:
    return request.hires is not None or request.refine is not None


def second_pass_steps(request: GenerationRequest, scheduler: Any) -> int:
    """The steps planned after the first pass, for one progress total over both: the expert
    ensemble's from the request's own schedule (`scheduler`, the first pass's: diffusers hands the
    timesteps under its cutoff to the refiner, and Karras-spaced schedules put more there than the
    plain share), the others' from their step counts and strengths."""
    if request.hires:
        return request.hires.repaint_steps
    if not request.refine:
        return 0
    if request.refine.mode != EXPERT_ENSEMBLE:
        return request.refine.refiner_steps
    scheduler.set_timesteps(request.num_inference_steps)
    trained = scheduler.config.num_train_timesteps
    cutoff = int(round(trained - request.refine.high_noise_frac * trained))
    return int((scheduler.timesteps < cutoff).sum())


def first_pass_arguments(request: GenerationRequest) -> dict[str, Any]:
    """What the first call changes: the latents out (an image upscaler needs the decoded image);
    the expert ensemble's base stops at high_noise_frac."""
    if not has_second_pass(request) or (request.hires and request.hires.upscaler in IMAGE_UPSCALERS):
        return {}
    arguments: dict[str, Any] = {"output_type": "latent"}
    if request.refine and request.refine.mode == EXPERT_ENSEMBLE:
        arguments["denoising_end"] = request.refine.high_noise_frac
    return arguments


def upscaled(first: Any, request: GenerationRequest) -> torch.Tensor | list[Image.Image]:
    """The first pass's output at the final size: latents resized (torch's interpolate), or the
    decoded images resized with Pillow."""
    hires = request.hires
    if hires.upscaler in LATENT_UPSCALERS:
        latents = first.images
        scale = latents.shape[-1] / request.width  # latent pixels per image pixel
        size = (round(hires.height * scale), round(hires.width * scale))
        return torch.nn.functional.interpolate(latents, size=size, mode=LATENT_UPSCALERS[hires.upscaler])
    resample = IMAGE_UPSCALERS[hires.upscaler]
    return [image.resize((hires.width, hires.height), resample) for image in first.images]


def hires_call(
    pipeline_for: Callable[[GenerationRequest], DiffusionPipeline],
    request: GenerationRequest,
    first: Any,
    arguments: Mapping[str, Any],
    generators: list[torch.Generator],
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The hires fix's image-to-image call at the final size (no ControlNet: it steered the layout)."""
    hires = request.hires
    second = dataclasses.replace(
        request,
        mode=Mode.IMAGE_TO_IMAGE,
        width=hires.width,
        height=hires.height,
        num_inference_steps=hires.steps,
        controlnets=(),
        hires=None,
    )
    pipeline = pipeline_for(second)
    call = _carried(arguments)
    call.update(
        image=upscaled(first, request),
        strength=hires.denoising_strength,
        num_inference_steps=hires.steps,
        generator=generators,
        output_type="pil",
    )
    return pipeline, call


def refiner_call(
    refiner: DiffusionPipeline,
    request: GenerationRequest,
    first: Any,
    arguments: Mapping[str, Any],
    texts: Sequence[tuple[str, str]],
    generators: list[torch.Generator],
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The refiner's call on the base's latents. It reads only the second text encoder, so it gets
    each job's prompt as text (with the request's embedding words expanded), not the base's
    embeddings of both encoders."""
    refine = request.refine
    scheduler = build_scheduler(
        request.scheduler, refiner.scheduler.config, refine.steps, request.timestep_spacing
    )
    pipeline = type(refiner)(**{**refiner.components, "scheduler": scheduler}, **_settings(refiner))
    pipeline.set_progress_bar_config(disable=True)
    call = {name: arguments[name] for name in _SHARED_ARGUMENTS if name in arguments}
    single = len(texts) == 1
    call.update(
        prompt=texts[0][0] if single else [prompt for prompt, _ in texts],
        negative_prompt=(texts[0][1] if single else [negative for _, negative in texts]) or None,
        image=first.images,
        num_inference_steps=refine.steps,
        generator=generators,
        output_type="pil",
    )
    if refine.mode == EXPERT_ENSEMBLE:
        call["denoising_start"] = refine.high_noise_frac
    else:
        call["strength"] = REFINE_STRENGTH
    return pipeline, call


def refiner_texts(jobs: Sequence[Job], parse: Callable[[str, str], str]) -> list[tuple[str, str]]:
    return [
        (parse("prompt", job.request.prompt), parse("negative_prompt", job.request.negative_prompt))
        for job in jobs
    ]


def _carried(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The first call's prompts and shared settings, for a second call of the same pipeline family."""
    return {name: arguments[name] for name in (*_PROMPT_ARGUMENTS, *_SHARED_ARGUMENTS) if name in arguments}


def _settings(pipeline: DiffusionPipeline) -> dict[str, Any]:
    settings = {
        name: pipeline.config[name]
        for name in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")
        if name in pipeline.config
    }
    return {**settings, "add_watermarker": False}  # the watermark is added when the files are written
