"""Second passes after the first denoising, as users know them: hires fix and the SDXL refiner.

- **Hires fix** (AUTOMATIC1111): draw at width x height (near the model's native size), upscale
  by `hires_scale` (the latents, or the decoded image), and repaint at the larger size with
  image-to-image at `hires_denoising_strength` for `hires_steps` steps (diffusers runs
  int(steps x strength) of them). A model asked directly for a size far above its native one draws
  doubled subjects; this keeps the first pass's layout. Text-to-image only, as in AUTOMATIC1111.
- **The SDXL refiner** (Replicate's SDXL inputs): `expert_ensemble_refiner` lets the base denoise
  the first `high_noise_frac` of the schedule and the refiner the rest (latents handed over);
  `base_image_refiner` lets the base finish and the refiner repaint its image at strength 0.3 for
  `refine_steps` steps (default: num_inference_steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdcog.errors import InputError
from sdcog.resolve.checks import check_choice, check_int, check_range, require_type

HIRES_SCALE_MIN, HIRES_SCALE_MAX = 1.0, 4.0
HIRES_STEPS_MIN, HIRES_STEPS_MAX = 0, 500
DEFAULT_HIRES_STRENGTH = 0.55
LATENT_UPSCALERS = {
    "Latent": "bilinear",
    "Latent (bicubic)": "bicubic",
    "Latent (nearest-exact)": "nearest-exact",
}
"""AUTOMATIC1111's latent upscalers: the latents resized (torch's interpolate) before the repaint."""
IMAGE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
"""Image upscalers: the first pass decoded, resized with Pillow, and encoded again."""
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
DEFAULT_HIRES_UPSCALER = "Latent"

NO_REFINER, EXPERT_ENSEMBLE, BASE_IMAGE = "no_refiner", "expert_ensemble_refiner", "base_image_refiner"
REFINE_MODES = (NO_REFINER, EXPERT_ENSEMBLE, BASE_IMAGE)
DEFAULT_HIGH_NOISE_FRAC = 0.8
REFINE_STRENGTH = 0.3
"""base_image_refiner's strength: diffusers' SDXL image-to-image default, as Replicate's SDXL runs it."""


@dataclass(frozen=True)
class HiresFix:
    scale: float
    steps: int
    """The second pass's num_inference_steps (int(steps x denoising_strength) of them run)."""
    denoising_strength: float
    upscaler: str
    width: int
    """The final size: the first pass's times `scale`, down to a multiple of 8."""
    height: int

    @property
    def repaint_steps(self) -> int:
        return int(self.steps * self.denoising_strength)

    def infotext(self) -> dict[str, object]:
        """AUTOMATIC1111's fields for a hires fix (its `Size` stays the first pass's)."""
        return {
            "Denoising strength": f"{self.denoising_strength:g}",
            "Hires upscale": f"{self.scale:g}",
            "Hires steps": self.steps,
            "Hires upscaler": self.upscaler,
        }


@dataclass(frozen=True)
class Refine:
    mode: str
    high_noise_frac: float
    steps: int
    """base_image_refiner: the refiner's num_inference_steps; expert ensemble: the shared schedule's."""

    @property
    def refiner_steps(self) -> int:
        """base_image_refiner's denoising steps (the expert ensemble's depend on the schedule:
        sdcog.generate.second_passes counts them)."""
        return int(self.steps * REFINE_STRENGTH)

    def infotext(self) -> dict[str, object]:
        fields: dict[str, object] = {"Refiner": self.mode}
        if self.mode == EXPERT_ENSEMBLE:
            fields["Refiner switch at"] = f"{self.high_noise_frac:g}"
        else:
            fields["Refiner steps"] = self.steps
        return fields


def resolve_hires(
    scale: float,
    steps: int | None,
    strength: float,
    upscaler: str,
    first_pass: tuple[int, int],
    base_steps: int,
    text_to_image: bool,
) -> HiresFix | None:
    """The hires fix asked for (None: `hires_scale` 1, off); every rule names its field."""
    require_type("hires_scale", scale, (int, float), "a number")
    check_range("hires_scale", scale, HIRES_SCALE_MIN, HIRES_SCALE_MAX)
    require_type("hires_denoising_strength", strength, (int, float), "a number")
    check_range("hires_denoising_strength", strength, 0.0, 1.0)
    upscaler = check_choice("hires_upscaler", upscaler, HIRES_UPSCALERS)
    if steps is not None:
        steps = check_int("hires_steps", steps, HIRES_STEPS_MIN, HIRES_STEPS_MAX)
    if scale == 1:
        return None
    if not text_to_image:
        raise InputError(
            "hires_scale",
            "hires fix is for text-to-image (as in AUTOMATIC1111); with an input image, ask for the "
            "larger size directly",
        )
    steps = steps or base_steps  # 0 or none: the first pass's count, as AUTOMATIC1111's 0
    if int(steps * strength) < 1:
        raise InputError(
            "hires_denoising_strength",
            f"{strength:g} x {steps} hires steps leaves no repaint step to run; raise either",
        )
    width, height = (int(side * scale) // 8 * 8 for side in first_pass)
    return HiresFix(float(scale), steps, float(strength), upscaler, width, height)


def resolve_refine(
    mode: str, high_noise_frac: float, steps: int | None, base_steps: int, refiner_available: str | None
) -> Refine | None:
    """The refiner pass asked for (None: no_refiner). `refiner_available`: None when a refiner is
    loaded for this model, else why not (the refusal names `refine` and says it)."""
    mode = check_choice("refine", mode, REFINE_MODES)
    require_type("high_noise_frac", high_noise_frac, (int, float), "a number")
    check_range("high_noise_frac", high_noise_frac, 0.0, 1.0)
    if steps is not None:
        steps = check_int("refine_steps", steps, 1, 500)
    if mode == NO_REFINER:
        return None
    if refiner_available is not None:
        raise InputError("refine", f"{mode} needs the SDXL refiner: {refiner_available}")
    if mode == EXPERT_ENSEMBLE:
        if not 0 < high_noise_frac < 1:
            raise InputError(
                "high_noise_frac", f"must be between 0 and 1 (exclusive) for {mode}, got {high_noise_frac:g}"
            )
        if steps is not None:
            raise InputError("refine_steps", f"is for base_image_refiner; {mode} shares num_inference_steps")
        return Refine(mode, float(high_noise_frac), base_steps)
    refine_steps = steps or base_steps
    if int(refine_steps * REFINE_STRENGTH) < 1:
        raise InputError("refine_steps", f"{refine_steps} x strength {REFINE_STRENGTH} leaves no step to run")
    return Refine(mode, float(high_noise_frac), refine_steps)
