"""Few-step models (SDXL Turbo, SDXL Lightning, LCM) and the defaults their authors publish.

A few-step model is distilled to draw in 1-8 steps without classifier-free guidance, with one
scheduler and timestep spacing; at the usual 30 steps and guidance 7 it draws badly. Its kind is
decided once at setup (`sdcog.model.checkpoints`) or per request by an LCM or Lightning LoRA in
`lora_weights`, and a request that leaves steps, guidance or the scheduler out gets these:

- SDXL Turbo / SD Turbo (stabilityai model cards): 1 step (1-4), guidance 0, Euler ancestral with
  "trailing" timestep spacing (the scheduler config the Turbo repositories ship).
- SDXL Lightning (ByteDance/SDXL-Lightning card): N steps for the N-step model (2, 4 or 8),
  guidance 0, Euler with "trailing" timestep spacing.
- LCM and LCM-LoRA (latent-consistency model cards): 4 steps (2-8), guidance 1 (off), LCMScheduler.

Kinds are named `turbo`, `lcm`, `lightning-2`, `lightning-4`, `lightning-8` in the settings
(`SDCOG_FEW_STEP`, `script/download-weights --few-step`) and in the metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FewStep:
    kind: str
    label: str
    steps: int
    guidance: float
    scheduler: str
    """A name of sdcog.resolve.schedulers.SCHEDULERS."""
    timestep_spacing: str | None = None
    """Overrides the model's scheduler config ("trailing" for Turbo and Lightning); None keeps it."""


FEW_STEP_KINDS: dict[str, FewStep] = {
    "turbo": FewStep("turbo", "Turbo", 1, 0.0, "K_EULER_ANCESTRAL", "trailing"),
    "lcm": FewStep("lcm", "LCM", 4, 1.0, "LCM"),
    **{
        f"lightning-{steps}": FewStep(
            f"lightning-{steps}", f"Lightning {steps}-step", steps, 0.0, "K_EULER", "trailing"
        )
        for steps in (2, 4, 8)
    },
}
NONE = "none"
SETTING_CHOICES = (NONE, *FEW_STEP_KINDS)

_LIGHTNING = re.compile(r"lightning[^0-9]{0,3}([248])[-_ ]?steps?", re.IGNORECASE)
_WORD = r"(?<![a-z0-9]){}(?![a-z])"


def few_step_from_name(name: str) -> FewStep | None:
    """The kind a file or repository name announces, as their authors name them:
    `sd_xl_turbo_1.0_fp16`, `sdxl_lightning_4step[_lora]`, `lcm-lora-sdxl`, `LCM_Dreamshaper_v7`."""
    lowered = name.lower()
    lightning = _LIGHTNING.search(lowered)
    if lightning:
        return FEW_STEP_KINDS[f"lightning-{lightning.group(1)}"]
    if re.search(_WORD.format("turbo"), lowered):
        return FEW_STEP_KINDS["turbo"]
    if re.search(_WORD.format("lcm"), lowered):
        return FEW_STEP_KINDS["lcm"]
    return None


def parse_setting(name: str, value: str) -> FewStep | None:
    """A declared kind (`none` or one of FEW_STEP_KINDS); anything else is refused naming `name`."""
    value = value.strip().lower()
    if value == NONE:
        return None
    if value not in FEW_STEP_KINDS:
        raise ValueError(f"{name}={value!r} is not a few-step kind; choose from {', '.join(SETTING_CHOICES)}")
    return FEW_STEP_KINDS[value]


def few_step_of_loras(references: list[str]) -> FewStep | None:
    """The kind an LCM or Lightning LoRA among a request's `lora_weights` brings (the first one's)."""
    for reference in references:
        kind = few_step_from_name(reference.rsplit("/", 1)[-1]) or few_step_from_name(reference)
        if kind is not None and kind.kind != "turbo":  # Turbo is a full model, never a LoRA
            return kind
    return None
