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

import secrets
from dataclasses import dataclass
from typing import Any

from sdcog.families import ModelFamily
from sdcog.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES

SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 64, 2048, 8
NUM_OUTPUTS_MIN, NUM_OUTPUTS_MAX = 1, 4
STEPS_MIN, STEPS_MAX = 1, 500
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
SEED_MIN, SEED_MAX = 0, 2**32 - 1
OUTPUT_FORMATS = ("webp", "jpg", "png")
DEFAULT_OUTPUT_FORMAT = "webp"
QUALITY_MIN, QUALITY_MAX, DEFAULT_QUALITY = 1, 100, 90


class InputError(ValueError):
    """An input breaks a rule. The message starts with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model contributes to request resolution."""

    family: ModelFamily
    native_width: int
    native_height: int


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

    @property
    def seeds(self) -> list[int]:
        return [self.seed + index for index in range(self.num_outputs)]


def _require_type(field: str, value: Any, kinds: tuple[type, ...], label: str) -> None:
    # bool is an int subclass; `true` is never a valid size or count.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InputError(field, f"must be {label}, got {value!r}")


def _check_range(field: str, value: int | float, low: int | float, high: int | float) -> None:
    if not low <= value <= high:
        raise InputError(field, f"must be between {low} and {high}, got {value}")


def _check_int(field: str, value: Any, low: int, high: int) -> int:
    _require_type(field, value, (int,), "an integer")
    _check_range(field, value, low, high)
    return value


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _resolve_size(field: str, value: int | None, native: int) -> int:
    if value is None:
        return native
    _check_int(field, value, SIZE_MIN, SIZE_MAX)
    if value % SIZE_MULTIPLE:
        raise InputError(
            field,
            f"must be a multiple of {SIZE_MULTIPLE}, got {value} "
            f"(nearest: {value - value % SIZE_MULTIPLE} or {value - value % SIZE_MULTIPLE + SIZE_MULTIPLE})",
        )
    return value


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(SEED_MAX + 1)
    return _check_int("seed", seed, SEED_MIN, SEED_MAX)


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
    scheduler: str = DEFAULT_SCHEDULER,
    seed: int | None = None,
    output_format: str = DEFAULT_OUTPUT_FORMAT,
    output_quality: int = DEFAULT_QUALITY,
) -> GenerationRequest:
    """Check every input and fill every default; raises InputError on the first broken rule."""
    family = model.family
    _require_type("prompt", prompt, (str,), "a string")
    if negative_prompt is not None:
        _require_type("negative_prompt", negative_prompt, (str,), "a string")
    width = _resolve_size("width", width, model.native_width)
    height = _resolve_size("height", height, model.native_height)
    num_outputs = _check_int("num_outputs", num_outputs, NUM_OUTPUTS_MIN, NUM_OUTPUTS_MAX)
    pixels = width * height * num_outputs
    if pixels > family.pixel_budget:
        raise InputError(
            "width/height/num_outputs",
            f"{width} x {height} x {num_outputs} = {pixels:,} pixels is over the "
            f"{family.pixel_budget:,}-pixel budget of {family.label} models; "
            "ask for a smaller size or fewer outputs",
        )
    if num_inference_steps is None:
        num_inference_steps = family.default_steps
    num_inference_steps = _check_int("num_inference_steps", num_inference_steps, STEPS_MIN, STEPS_MAX)
    if guidance_scale is None:
        guidance_scale = family.default_guidance
    _require_type("guidance_scale", guidance_scale, (int, float), "a number")
    _check_range("guidance_scale", guidance_scale, GUIDANCE_MIN, GUIDANCE_MAX)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        width=width,
        height=height,
        num_outputs=num_outputs,
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        scheduler=_check_choice("scheduler", scheduler, SCHEDULER_NAMES),
        seed=_resolve_seed(seed),
        output_format=_check_choice("output_format", output_format, OUTPUT_FORMATS),
        output_quality=_check_int("output_quality", output_quality, QUALITY_MIN, QUALITY_MAX),
    )
