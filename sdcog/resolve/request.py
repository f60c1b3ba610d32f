"""The validated, fully resolved generation request.

`resolve_request` turns raw inputs (as a user sends them, with `None` for "not given") into a
`GenerationRequest` whose every value is concrete: defaults filled from the model family, a seed
drawn when none was given, and every rule checked before any heavy work. A broken rule raises
`InputError`, whose message names the field, the rule and the value.

The ranges here are the same ones `predict.py` declares in its `cog.Input`s (a test keeps them in
step): the HTTP server enforces those from the schema, and this module enforces them for every
other caller, plus the rules a JSON schema cannot express (multiples of 8, the pixel budget).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image

from sdcog.errors import InputError
from sdcog.fetch.adapter_references import AdapterReference, parse_reference
from sdcog.fetch.images import SIZE_MULTIPLE, Outpaint, as_rgb, binary_mask, extend_canvas, round_to_multiple
from sdcog.model.families import ModelFamily
from sdcog.resolve.checks import check_choice, check_int, check_range, require_type
from sdcog.resolve.control import (
    DEFAULT_CANNY_HIGH,
    DEFAULT_CANNY_LOW,
    SIZING_STRATEGIES,
    CheckedSlot,
    ControlRequest,
    ControlSlot,
    canny_thresholds,
    check_slots,
    resolve_control,
)
from sdcog.resolve.few_step import FewStep, few_step_of_loras
from sdcog.resolve.schedulers import DEFAULT_SCHEDULER, MODEL_DEFAULT, SCHEDULER_CHOICES
from sdcog.resolve.second_passes import (
    DEFAULT_HIGH_NOISE_FRAC,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    EXPERT_ENSEMBLE,
    NO_REFINER,
    HiresFix,
    Refine,
    resolve_hires,
    resolve_refine,
)
from sdcog.write.infotext import JPEG_PROMPT_BYTES, prompt_lines_utf16_bytes

SIZE_MIN, SIZE_MAX = 64, 2048
NUM_OUTPUTS_MIN, NUM_OUTPUTS_MAX = 1, 4
STEPS_MIN, STEPS_MAX = 1, 500
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
CLIP_SKIP_MIN, CLIP_SKIP_MAX = 1, 12
"""AUTOMATIC1111's range: 1 (the last layer) to 12 (the first of CLIP ViT-L's twelve)."""
SEED_MIN, SEED_MAX = 0, 2**32 - 1
MAX_PROMPT_CHARS = 20_000
"""The longest prompt or negative prompt read, in characters: checked first, so a huge one costs
nothing. 600 tokens (the token limit, `sdcog.generate.prompt_encoding.MAX_PROMPT_TOKENS`) of weighted words
take well under half of it."""
OUTPUT_FORMATS = ("webp", "jpg", "png")
DEFAULT_OUTPUT_FORMAT = "webp"
QUALITY_MIN, QUALITY_MAX, DEFAULT_QUALITY = 1, 100, 90
STRENGTH_MIN, STRENGTH_MAX, DEFAULT_STRENGTH = 0.0, 1.0, 0.8
OUTPAINT_MIN, OUTPAINT_MAX = 0, 1024
MAX_LORAS = 4
MAX_EMBEDDINGS = 8
LORA_SCALE_MIN, LORA_SCALE_MAX, DEFAULT_LORA_SCALE = -4.0, 4.0, 1.0
OUTPAINT_FIELDS = ("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom")


class Mode(StrEnum):
    """What a request does, decided by its inputs: an image makes it image-to-image, an image with a
    mask or outpainting makes it inpainting. The values are what the metadata records."""

    TEXT_TO_IMAGE = "txt2img"
    IMAGE_TO_IMAGE = "img2img"
    INPAINT = "inpaint"


NO_REFINER_LOADED = (
    "no refiner is loaded: run `script/download-weights --refiner` (or set REFINER_WEIGHTS) and restart"
)


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model contributes to request resolution."""

    family: ModelFamily
    native_width: int
    native_height: int
    few_step: FewStep | None = None
    """A few-step model's kind (sdcog/resolve/few_step.py): its defaults fill omitted inputs."""
    inpainting: bool = False
    """An inpainting model (9-channel UNet): every mode runs through its inpainting pipeline."""
    refiner_missing: str | None = NO_REFINER_LOADED
    """Why `refine` is refused (no refiner loaded, not SDXL); None: a refiner is loaded."""


@dataclass(frozen=True)
class LoraRequest:
    reference: AdapterReference
    scale: float = DEFAULT_LORA_SCALE
    field: str = "lora_weights"
    """The input that named it: lora_weights, or replicate_weights (a trained version's own LoRA)."""


@dataclass(frozen=True)
class EmbeddingRequest:
    reference: AdapterReference
    token: str | None = None
    """The word that stands for the embedding in prompts; None: the file's own name for it."""


EMBEDDING_TOKEN = re.compile(r"[^\s,=:/()\[\]\\]{1,64}")
"""An embedding's word: no spaces, commas or prompt syntax ( ) [ ] : \\, at most 64 characters."""
_TOKEN_PREFIX = re.compile(rf"^(?P<token>{EMBEDDING_TOKEN.pattern})=(?P<reference>.+)$")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    """Image i is generated from seed + i with its own generator."""
    output_format: str
    output_quality: int
    mode: Mode = Mode.TEXT_TO_IMAGE
    """txt2img, img2img or inpaint (outpainting is inpainting on an extended canvas)."""
    init_image: Image.Image | None = field(default=None, repr=False)
    """The input image at the output size (on the extended canvas when outpainting)."""
    mask_image: Image.Image | None = field(default=None, repr=False)
    """Black/white at the output size: white is repainted."""
    prompt_strength: float = DEFAULT_STRENGTH
    outpaint: Outpaint = field(default_factory=Outpaint)
    disable_safety_checker: bool = False
    """Skip the model's safety checker (models without one are never checked)."""
    loras: tuple[LoraRequest, ...] = ()
    embeddings: tuple[EmbeddingRequest, ...] = ()
    controlnets: tuple[ControlRequest, ...] = ()
    """The ControlNets steering it, in slot order (none: the plain pipeline, as before)."""
    return_control_maps: bool = False
    """Also return each ControlNet's preprocessed control map, after the images."""
    few_step: FewStep | None = None
    """The few-step kind in force (the model's, or an LCM/Lightning LoRA's): its timestep spacing
    applies to any scheduler."""
    clip_skip: int = 1
    """AUTOMATIC1111's clip skip: 1 uses the text encoder's last layer, 2 the one before, ..."""
    inpainting_model: bool = False
    """The model is an inpainting model: text-to-image and image-to-image run as inpainting of
    the whole canvas."""
    hires: HiresFix | None = None
    """A hires fix after the first pass (text-to-image only): the output is `hires.width` x
    `hires.height`; `width` x `height` is the first pass's size, as AUTOMATIC1111 records it."""
    refine: Refine | None = None
    """The SDXL refiner's pass after the base's (expert ensemble or base image)."""
    apply_watermark: bool = True
    """An invisible watermark in each image of 256 px and more (sdcog/write/watermark.py)."""

    @property
    def timestep_spacing(self) -> str | None:
        """The few-step kind's spacing ("trailing"), over any scheduler's own; None keeps it."""
        return self.few_step.timestep_spacing if self.few_step else None

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.hires.width, self.hires.height) if self.hires else (self.width, self.height)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + index for index in range(self.num_outputs)]


def _resolve_size(field: str, value: int | None, native: int) -> int:
    return native if value is None else _check_size(field, value)


def _check_size(field: str, value: Any) -> int:
    check_int(field, value, SIZE_MIN, SIZE_MAX)
    if value % SIZE_MULTIPLE:
        raise InputError(
            field,
            f"must be a multiple of {SIZE_MULTIPLE}, got {value} "
            f"(nearest: {value - value % SIZE_MULTIPLE} or {value - value % SIZE_MULTIPLE + SIZE_MULTIPLE})",
        )
    return value


def _resolve_seed(seed: int | None, num_outputs: int) -> int:
    """The first image's seed; the last image's (seed + num_outputs - 1) must be a valid seed too, so
    that every image of the batch can be made again alone."""
    highest = SEED_MAX - (num_outputs - 1)
    if seed is None:
        return secrets.randbelow(highest + 1)
    check_int("seed", seed, SEED_MIN, SEED_MAX)
    if seed > highest:
        raise InputError(
            "seed",
            f"{seed} with num_outputs={num_outputs} gives the last image seed {seed + num_outputs - 1}, "
            f"over the largest seed {SEED_MAX}: use a seed up to {highest}",
        )
    return seed


def _check_fits_jpeg(prompt: str, negative_prompt: str) -> None:
    size = prompt_lines_utf16_bytes(prompt, negative_prompt)
    if size > JPEG_PROMPT_BYTES:
        raise InputError(
            "output_format",
            f"jpg files hold at most 64 KB of metadata, and these prompts take {size / 1000:.0f} KB of "
            "it: choose png or webp, or shorten the prompts",
        )


def _check_prompt(field: str, prompt: Any) -> None:
    require_type(field, prompt, (str,), "a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(
            field, f"is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}: shorten it"
        )


def resolve_request(
    model: ModelLimits,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    width: int | None = None,
    height: int | None = None,
    num_outputs: int = 1,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str = MODEL_DEFAULT,
    seed: int | None = None,
    output_format: str = DEFAULT_OUTPUT_FORMAT,
    output_quality: int = DEFAULT_QUALITY,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    prompt_strength: float = DEFAULT_STRENGTH,
    outpaint: Outpaint | None = None,
    disable_safety_checker: bool = False,
    lora_weights: str | None = None,
    lora_scales: str | None = None,
    embeddings: str | None = None,
    replicate_weights: str | None = None,
    controlnets: Sequence[ControlSlot] = (),
    sizing_strategy: str = "auto",
    canny_low_threshold: int = DEFAULT_CANNY_LOW,
    canny_high_threshold: int = DEFAULT_CANNY_HIGH,
    return_control_maps: bool = False,
    clip_skip: int = 1,
    hires_scale: float = 1.0,
    hires_steps: int | None = None,
    hires_denoising_strength: float = DEFAULT_HIRES_STRENGTH,
    hires_upscaler: str = DEFAULT_HIRES_UPSCALER,
    refine: str = NO_REFINER,
    high_noise_frac: float = DEFAULT_HIGH_NOISE_FRAC,
    refine_steps: int | None = None,
    apply_watermark: bool = True,
) -> GenerationRequest:
    """Check every input and fill every default; raises InputError on the first broken rule.

    With `image` the request is image-to-image; with `mask` or `outpaint` as well, inpainting.
    `controlnets` (up to three slots) steer any mode; `sizing_strategy` picks where the output size
    comes from (see `sdcog.resolve.control.SIZING_STRATEGIES`).
    """
    family = model.family
    _check_prompt("prompt", prompt)
    if negative_prompt is not None:
        _check_prompt("negative_prompt", negative_prompt)
    outpaint = _check_outpaint(outpaint or Outpaint())
    slots = check_slots(list(controlnets), family.key)
    canny = canny_thresholds(canny_low_threshold, canny_high_threshold)
    require_type("return_control_maps", return_control_maps, (bool,), "true or false")
    width, height = _sized_by(sizing_strategy, width, height, image, slots, model)
    if image is None:
        if mask is not None:
            raise InputError("mask", "needs an image to inpaint: send `image` as well")
        if outpaint:
            raise InputError(
                _first_outpaint_field(outpaint), "needs an image to extend: send `image` as well"
            )
        width = _resolve_size("width", width, model.native_width)
        height = _resolve_size("height", height, model.native_height)
        init_image = mask_image = None
        mode = Mode.TEXT_TO_IMAGE
    else:
        init_image, mask_image = _prepare_images(image, mask, outpaint, width, height)
        width, height = init_image.size
        mode = Mode.INPAINT if mask_image is not None else Mode.IMAGE_TO_IMAGE
    controls = tuple(resolve_control(slot, (width, height), canny) for slot in slots)
    if return_control_maps and not controls:
        raise InputError("return_control_maps", "is set but no ControlNet is used (controlnet_1 ...)")
    num_outputs = check_int("num_outputs", num_outputs, NUM_OUTPUTS_MIN, NUM_OUTPUTS_MAX)
    loras = _replicate_weights(replicate_weights) + _resolve_loras(lora_weights, lora_scales)
    few_step = model.few_step or few_step_of_loras([lora.reference.text for lora in loras])
    if num_inference_steps is None:
        num_inference_steps = few_step.steps if few_step else family.default_steps
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, STEPS_MIN, STEPS_MAX)
    if guidance_scale is None:
        guidance_scale = few_step.guidance if few_step else family.default_guidance
    scheduler = check_choice("scheduler", scheduler, SCHEDULER_CHOICES)
    if scheduler == MODEL_DEFAULT:
        scheduler = few_step.scheduler if few_step else DEFAULT_SCHEDULER
    hires = resolve_hires(
        hires_scale,
        hires_steps,
        hires_denoising_strength,
        hires_upscaler,
        (width, height),
        num_inference_steps,
        mode == Mode.TEXT_TO_IMAGE,
    )
    if hires and model.inpainting:
        raise InputError("hires_scale", "hires fix needs a text-to-image model; this is an inpainting model")
    refined = resolve_refine(
        refine, high_noise_frac, refine_steps, num_inference_steps, model.refiner_missing
    )
    if refined and hires:
        raise InputError("refine", "does not combine with a hires fix here: choose one second pass")
    if refined and refined.mode == EXPERT_ENSEMBLE and controls:
        raise InputError(
            "refine", "expert_ensemble_refiner does not combine with ControlNets; use base_image_refiner"
        )
    final_width, final_height = (hires.width, hires.height) if hires else (width, height)
    pixels = final_width * final_height * num_outputs
    if pixels > family.pixel_budget:
        sizes = "hires_scale/width/height/num_outputs" if hires else "width/height/num_outputs"
        raise InputError(
            sizes,
            f"{final_width} x {final_height} x {num_outputs} = {pixels:,} pixels is over the "
            f"{family.pixel_budget:,}-pixel budget of {family.label} models; "
            "ask for a smaller size or fewer outputs",
        )
    require_type("apply_watermark", apply_watermark, (bool,), "true or false")
    require_type("guidance_scale", guidance_scale, (int, float), "a number")
    check_range("guidance_scale", guidance_scale, GUIDANCE_MIN, GUIDANCE_MAX)
    require_type("disable_safety_checker", disable_safety_checker, (bool,), "true or false")
    require_type("prompt_strength", prompt_strength, (int, float), "a number")
    check_range("prompt_strength", prompt_strength, STRENGTH_MIN, STRENGTH_MAX)
    if mode != Mode.TEXT_TO_IMAGE and int(num_inference_steps * prompt_strength) < 1:
        raise InputError(
            "prompt_strength",
            f"{prompt_strength:g} x {num_inference_steps} steps leaves no denoising step to run "
            "(diffusers runs int(num_inference_steps x prompt_strength) steps); raise either",
        )
    output_format = check_choice("output_format", output_format, OUTPUT_FORMATS)
    if output_format == "jpg":
        _check_fits_jpeg(prompt, negative_prompt or "")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        width=width,
        height=height,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        scheduler=scheduler,
        seed=_resolve_seed(seed, num_outputs),
        output_format=output_format,
        output_quality=check_int("output_quality", output_quality, QUALITY_MIN, QUALITY_MAX),
        mode=mode,
        init_image=init_image,
        mask_image=mask_image,
        prompt_strength=float(prompt_strength),
        outpaint=outpaint,
        disable_safety_checker=disable_safety_checker,
        loras=loras,
        embeddings=_resolve_embeddings(embeddings),
        controlnets=controls,
        return_control_maps=return_control_maps,
        few_step=few_step,
        clip_skip=check_int("clip_skip", clip_skip, CLIP_SKIP_MIN, CLIP_SKIP_MAX),
        inpainting_model=model.inpainting,
        hires=hires,
        refine=refined,
        apply_watermark=apply_watermark,
    )


def _sized_by(
    strategy: str,
    width: int | None,
    height: int | None,
    image: Image.Image | None,
    slots: list[CheckedSlot],
    model: ModelLimits,
) -> tuple[int | None, int | None]:
    """The width and height the sizing strategy asks for (None: by the rule without a strategy)."""
    strategy = check_choice("sizing_strategy", strategy, SIZING_STRATEGIES)
    if strategy == "auto":
        return width, height
    if strategy == "width_height":
        return (
            _resolve_size("width", width, model.native_width),
            _resolve_size("height", height, model.native_height),
        )
    if strategy == "input_image":
        if image is None:
            raise InputError("sizing_strategy", "is input_image but no image is given")
        return None, None
    source = strategy.removesuffix("_image")
    control = next((checked.slot.image for checked in slots if checked.field == source), None)
    if control is None:
        raise InputError("sizing_strategy", f"is {strategy} but {source} is not used")
    size = (round_to_multiple(control.width), round_to_multiple(control.height))
    if max(size) > SIZE_MAX or min(size) < SIZE_MIN:
        raise InputError(
            f"{source}_image",
            f"is {control.width}x{control.height}: as the output size (sizing_strategy {strategy}) "
            f"each side must be between {SIZE_MIN} and {SIZE_MAX}",
        )
    return size


def _split_list(value: str) -> list[str]:
    """Items separated by commas, spaces or newlines (a data URI keeps the comma after its header)."""
    return re.findall(r"(?:[^,\s=]+=)?data:[^,\s]*,[^,\s]*|[^,\s]+", value)


def _resolve_embeddings(embeddings: str | None) -> tuple[EmbeddingRequest, ...]:
    """The embedding references, each optionally after `<token>=`."""
    if embeddings is None:
        return ()
    require_type("embeddings", embeddings, (str,), "a string")
    resolved = []
    for item in _split_list(embeddings):
        named = _TOKEN_PREFIX.match(item)
        token, text = (named["token"], named["reference"]) if named else (None, item)
        resolved.append(EmbeddingRequest(parse_reference("embeddings", text), token))
    if len(resolved) > MAX_EMBEDDINGS:
        raise InputError("embeddings", f"names {len(resolved)} embeddings; the limit is {MAX_EMBEDDINGS}")
    tokens = [embedding.token.lower() for embedding in resolved if embedding.token]
    if duplicated := sorted({token for token in tokens if tokens.count(token) > 1}):
        raise InputError("embeddings", f"gives the token {duplicated[0]!r} to two embeddings")
    return tuple(resolved)


def _replicate_weights(replicate_weights: str | None) -> tuple[LoraRequest, ...]:
    """What Replicate's platform passes when a version made by `cog train` runs: its trained tar,
    applied first at scale 1, before the request's own lora_weights."""
    if replicate_weights is None:
        return ()
    require_type("replicate_weights", replicate_weights, (str,), "a string")
    if not replicate_weights.strip():
        return ()
    reference = parse_reference("replicate_weights", replicate_weights)
    return (LoraRequest(reference, DEFAULT_LORA_SCALE, "replicate_weights"),)


def _resolve_loras(lora_weights: str | None, lora_scales: str | None) -> tuple[LoraRequest, ...]:
    """The LoRA references with their scales (one scale for all, or one each; default 1)."""
    if lora_weights is not None:
        require_type("lora_weights", lora_weights, (str,), "a string")
    if lora_scales is not None:
        require_type("lora_scales", lora_scales, (str,), "a string of numbers")
    references = [parse_reference("lora_weights", item) for item in _split_list(lora_weights or "")]
    if len(references) > MAX_LORAS:
        raise InputError("lora_weights", f"names {len(references)} LoRAs; the limit is {MAX_LORAS}")
    scales = []
    for item in _split_list(lora_scales or ""):
        try:
            scale = float(item)
        except ValueError:
            raise InputError("lora_scales", f"must be numbers separated by commas, got {item!r}") from None
        check_range("lora_scales", scale, LORA_SCALE_MIN, LORA_SCALE_MAX)
        scales.append(scale)
    if scales and not references:
        raise InputError("lora_scales", "is set but lora_weights names no LoRA")
    if len(scales) == 1:
        scales *= len(references)
    if scales and len(scales) != len(references):
        raise InputError(
            "lora_scales",
            f"has {len(scales)} values for {len(references)} LoRAs: give one value, or one per LoRA",
        )
    return tuple(
        LoraRequest(reference, scale)
        for reference, scale in zip(references, scales or [DEFAULT_LORA_SCALE] * len(references), strict=True)
    )


def _first_outpaint_field(outpaint: Outpaint) -> str:
    return next(name for name, amount in zip(OUTPAINT_FIELDS, outpaint.amounts, strict=True) if amount)


def _check_outpaint(outpaint: Outpaint) -> Outpaint:
    for name, amount in zip(OUTPAINT_FIELDS, outpaint.amounts, strict=True):
        check_int(name, amount, OUTPAINT_MIN, OUTPAINT_MAX)
    return outpaint


def _image_size(image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
    """The size the input image is used at: the asked size, else its own rounded to multiples of 8.

    With only one side asked for, the other keeps the image's aspect ratio.
    """
    if width is not None:
        width = _check_size("width", width)
    if height is not None:
        height = _check_size("height", height)
    if width is None and height is None:
        size = (round_to_multiple(image.width), round_to_multiple(image.height))
    elif height is None:
        size = (width, round_to_multiple(width * image.height / image.width))
    elif width is None:
        size = (round_to_multiple(height * image.width / image.height), height)
    else:
        size = (width, height)
    if max(size) > SIZE_MAX or min(size) < SIZE_MIN:
        raise InputError(
            "image",
            f"is {image.width}x{image.height}, used at {size[0]}x{size[1]}: each side must be between "
            f"{SIZE_MIN} and {SIZE_MAX}; set width and/or height to scale it",
        )
    return size


def _prepare_images(
    image: Image.Image, mask: Image.Image | None, outpaint: Outpaint, width: int | None, height: int | None
) -> tuple[Image.Image, Image.Image | None]:
    """The input image (and mask) at the output size, on the extended canvas when outpainting."""
    size = _image_size(image, width, height)
    rgb = as_rgb(image)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    mask_image = None if mask is None else binary_mask(mask, size)
    if outpaint:
        rgb, mask_image = extend_canvas(rgb, mask_image, outpaint)
        if max(rgb.size) > SIZE_MAX:
            raise InputError(
                _first_outpaint_field(outpaint),
                f"the extended canvas would be {rgb.width}x{rgb.height}; "
                f"each side must be at most {SIZE_MAX}",
            )
    return rgb, mask_image
