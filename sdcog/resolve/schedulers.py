"""Scheduler names users choose from, and how each is built for one request.

Every scheduler is built fresh per request from the loaded pipeline's own scheduler config (so a
v-prediction model keeps `prediction_type`, an SDXL model its timestep spacing), plus the
overrides that make it the named sampler. Nothing shared between requests is changed.

The classic Replicate names come first; the rest use AUTOMATIC1111's sampler names, which is also
how every scheduler is written into the embedded generation metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from sdcog.errors import InputError


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    """A diffusers scheduler class."""
    infotext_name: str
    """The sampler name AUTOMATIC1111's infotext uses for it."""
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def build(self, base_config: Mapping[str, Any]) -> SchedulerMixin:
        scheduler_class = getattr(diffusers, self.class_name)
        return scheduler_class.from_config(dict(base_config), **self.overrides)


def _spec(class_name: str, infotext_name: str, **overrides: Any) -> SchedulerSpec:
    return SchedulerSpec(class_name, infotext_name, MappingProxyType(overrides))


_KARRAS = {"use_karras_sigmas": True}

SCHEDULERS: Mapping[str, SchedulerSpec] = MappingProxyType(
    {
        # The classic names of Replicate's stable-diffusion models.
        "DDIM": _spec("DDIMScheduler", "DDIM"),
        "K_EULER": _spec("EulerDiscreteScheduler", "Euler"),
        "K_EULER_ANCESTRAL": _spec("EulerAncestralDiscreteScheduler", "Euler a"),
        "DPMSolverMultistep": _spec("DPMSolverMultistepScheduler", "DPM++ 2M"),
        # PLMS, as AUTOMATIC1111 and SD 1.x's own scheduler config run it: without the Runge-Kutta
        # warm-up, which needs at least 4 steps (SDXL's config does not set it: 1-3 steps failed).
        "PNDM": _spec("PNDMScheduler", "PLMS", skip_prk_steps=True),
        "KLMS": _spec("LMSDiscreteScheduler", "LMS"),
        # AUTOMATIC1111 names for the samplers users ask for most.
        "DPM++ 2M Karras": _spec("DPMSolverMultistepScheduler", "DPM++ 2M Karras", **_KARRAS),
        "DPM++ 2M SDE": _spec(
            "DPMSolverMultistepScheduler", "DPM++ 2M SDE", algorithm_type="sde-dpmsolver++"
        ),
        "DPM++ 2M SDE Karras": _spec(
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE Karras",
            algorithm_type="sde-dpmsolver++",
            **_KARRAS,
        ),
        "DPM2 Karras": _spec("KDPM2DiscreteScheduler", "DPM2 Karras", **_KARRAS),
        "DPM2 a Karras": _spec("KDPM2AncestralDiscreteScheduler", "DPM2 a Karras", **_KARRAS),
        "Euler Karras": _spec("EulerDiscreteScheduler", "Euler Karras", **_KARRAS),
        "Heun": _spec("HeunDiscreteScheduler", "Heun"),
        "LMS Karras": _spec("LMSDiscreteScheduler", "LMS Karras", **_KARRAS),
        "UniPC": _spec("UniPCMultistepScheduler", "UniPC"),
        "DEIS": _spec("DEISMultistepScheduler", "DEIS"),
        "DDPM": _spec("DDPMScheduler", "DDPM"),
        "LCM": _spec("LCMScheduler", "LCM"),
    }
)

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
DEFAULT_SCHEDULER = "DPM++ 2M Karras"
"""What `default` means for a model that is not a few-step model."""
MODEL_DEFAULT = "default"
"""The `scheduler` input's default: the model's own sampler (DEFAULT_SCHEDULER, or a few-step
model's, sdcog/resolve/few_step.py)."""
SCHEDULER_CHOICES: tuple[str, ...] = (MODEL_DEFAULT, *SCHEDULER_NAMES)


def build_scheduler(
    name: str, base_config: Mapping[str, Any], steps: int | None = None, timestep_spacing: str | None = None
) -> SchedulerMixin:
    """A new scheduler instance for one request; `name` must be one of SCHEDULER_NAMES. With `steps`,
    a step count the scheduler cannot run is refused naming num_inference_steps; `timestep_spacing`
    (a few-step model's "trailing") overrides the config's."""
    if timestep_spacing is not None:
        base_config = {**base_config, "timestep_spacing": timestep_spacing}
    scheduler = SCHEDULERS[name].build(base_config)
    # LCM picks its steps among those of its distillation schedule (original_inference_steps).
    most = scheduler.config.get("original_inference_steps")
    if steps is not None and most is not None and steps > most:
        raise InputError(
            "num_inference_steps", f"{name} runs at most {most} steps on this model, got {steps}"
        )
    return scheduler
