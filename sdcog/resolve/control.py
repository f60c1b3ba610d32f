"""ControlNet inputs resolved: which ControlNet, its control image at the output size, how strongly
and over which part of the denoising it steers, and how the control image is preprocessed.

A ControlNet is named by a short name from `CONTROLNETS` (resolved for the loaded model's family:
`canny` is lllyasviel's SD 1.5 Canny ControlNet on SD 1.x and diffusers' SDXL one on SDXL), or by a
reference in the forms `lora_weights` takes (a Hugging Face repository in diffusers format, an https
URL or data URI of a `.safetensors` file, a Replicate model whose weights tar holds one).

The control image is fitted to the output size as AUTOMATIC1111's "Crop and Resize" does (scaled
to cover it, centred, the overhang cut), so a control map of another aspect ratio is never
stretched; `sizing_strategy` can make the output size the control image's own instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageOps

from sdcog.errors import InputError
from sdcog.fetch.adapter_references import AdapterReference, parse_reference
from sdcog.fetch.images import as_rgb
from sdcog.resolve.checks import check_int, check_number

MAX_CONTROLNETS = 3
CONTROL_SCALE_MIN, CONTROL_SCALE_MAX, DEFAULT_CONTROL_SCALE = 0.0, 4.0, 1.0
CANNY_MIN, CANNY_MAX = 1, 255
DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH = 100, 200
"""AUTOMATIC1111's and diffusers' examples' Canny thresholds."""
PREPROCESSORS = ("none", "canny", "depth")
"""`none`: the image already is the control map; `canny`: OpenCV's Canny edges (no weights);
`depth`: a depth estimator, whose weights `script/download-weights --preprocessor depth` bakes in."""
SIZING_STRATEGIES = (
    "auto",
    "width_height",
    "input_image",
    *(f"controlnet_{slot}_image" for slot in range(1, MAX_CONTROLNETS + 1)),
)
"""`auto` (the default) is the rule without ControlNet: the input image's size unless width/height
are given, else width/height (the model's native size when omitted)."""
BUNDLED_CONTROLNET = "shapes-silhouette"


@dataclass(frozen=True)
class KnownControlNet:
    """A short name's ControlNet per model family (Hugging Face repositories in diffusers format)."""

    description: str
    repositories: dict[str, str]
    """By family key (sd1, sd2, sdxl); a family missing has no such ControlNet here."""
    preprocessor: str = "none"
    """What its control image goes through when the request does not say."""


CONTROLNETS: dict[str, KnownControlNet] = {
    "canny": KnownControlNet(
        "Canny edges",
        {
            "sd1": "lllyasviel/control_v11p_sd15_canny",
            "sd2": "thibaud/controlnet-sd21-canny-diffusers",
            "sdxl": "diffusers/controlnet-canny-sdxl-1.0",
        },
        "canny",
    ),
    "depth": KnownControlNet(
        "depth maps (near is bright)",
        {
            "sd1": "lllyasviel/control_v11f1p_sd15_depth",
            "sd2": "thibaud/controlnet-sd21-depth-diffusers",
            "sdxl": "diffusers/controlnet-depth-sdxl-1.0",
        },
        "depth",
    ),
    "openpose": KnownControlNet(
        "OpenPose skeletons (send the pose image)",
        {"sd1": "lllyasviel/control_v11p_sd15_openpose", "sd2": "thibaud/controlnet-sd21-openpose-diffusers"},
    ),
    "scribble": KnownControlNet(
        "scribbles, white lines on black",
        {"sd1": "lllyasviel/control_v11p_sd15_scribble", "sdxl": "xinsir/controlnet-scribble-sdxl-1.0"},
    ),
    "lineart": KnownControlNet(
        "line art, white lines on black", {"sd1": "lllyasviel/control_v11p_sd15_lineart"}
    ),
    "softedge": KnownControlNet(
        "soft edges (HED/PiDiNet maps)", {"sd1": "lllyasviel/control_v11p_sd15_softedge"}
    ),
    "tile": KnownControlNet(
        "tile: details from a low-resolution image of the same scene",
        {"sd1": "lllyasviel/control_v11f1e_sd15_tile", "sdxl": "xinsir/controlnet-tile-sdxl-1.0"},
    ),
    BUNDLED_CONTROLNET: KnownControlNet(
        "the bundled shapes model's silhouettes (white where the object goes); ships in the image",
        {},
    ),
}


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet slot of a request, resolved."""

    field: str
    """The slot's model input: controlnet_1, controlnet_2 or controlnet_3; its other inputs are
    `<field>_image`, `<field>_conditioning_scale`, `<field>_start`, `<field>_end`, `<field>_preprocessor`."""
    name: str
    """The short name, or the reference's name (for logs and metadata)."""
    reference: AdapterReference | None
    """Where its weights come from; None for the bundled ControlNet."""
    image: Image.Image = field(repr=False)
    """The control image at the output size, as sent (before preprocessing)."""
    conditioning_scale: float = DEFAULT_CONTROL_SCALE
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    canny_thresholds: tuple[int, int] = (DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH)
    control_map: Image.Image | None = field(default=None, repr=False, compare=False)
    """The preprocessed map the ControlNet reads (set by `sdcog.fetch.control_maps`)."""

    @property
    def key(self) -> tuple:
        """What makes two slots steer alike (for batching), but for their maps."""
        return (self.name, self.reference, self.conditioning_scale, self.start, self.end)


@dataclass(frozen=True)
class ControlSlot:
    """One slot's inputs as the user sent them (None: not given)."""

    model: str | None = None
    image: Image.Image | None = None
    conditioning_scale: float = DEFAULT_CONTROL_SCALE
    start: float = 0.0
    end: float = 1.0
    preprocessor: str | None = None


def slot_field(index: int) -> str:
    return f"controlnet_{index + 1}"


def canny_thresholds(low: object, high: object) -> tuple[int, int]:
    check_int("canny_low_threshold", low, CANNY_MIN, CANNY_MAX)
    check_int("canny_high_threshold", high, CANNY_MIN, CANNY_MAX)
    if low > high:
        raise InputError("canny_low_threshold", f"{low} is above canny_high_threshold {high}")
    return low, high


@dataclass(frozen=True)
class CheckedSlot:
    """A slot in use, its ControlNet named and its settings checked (its image not yet sized)."""

    index: int
    slot: ControlSlot
    label: str
    reference: AdapterReference | None
    preprocessor: str

    @property
    def field(self) -> str:
        return slot_field(self.index)


def check_slots(slots: list[ControlSlot], family_key: str) -> list[CheckedSlot]:
    """The slots in use (a ControlNet named), each checked for a model of `family_key`: its name or
    reference first, then its image's presence and its settings; refusals name the slot's input.
    A slot with an image but no ControlNet is refused too."""
    if len(slots) > MAX_CONTROLNETS:
        raise InputError("controlnet", f"{len(slots)} ControlNets; the limit is {MAX_CONTROLNETS}")
    used = []
    for index, slot in enumerate(slots):
        name = slot_field(index)
        if slot.model is not None and not isinstance(slot.model, str):
            raise InputError(name, f"must be a string, got {slot.model!r}")
        model = (slot.model or "").strip()
        if not model or model == "none":
            if slot.image is not None:
                raise InputError(f"{name}_image", f"is given but {name} names no ControlNet")
            continue
        label, reference, default_preprocessor = _named(name, model, family_key)
        if slot.image is None:
            raise InputError(f"{name}_image", f"is required with {name} ({model!r})")
        scale = check_number(
            f"{name}_conditioning_scale", slot.conditioning_scale, CONTROL_SCALE_MIN, CONTROL_SCALE_MAX
        )
        start = check_number(f"{name}_start", slot.start, 0.0, 1.0)
        end = check_number(f"{name}_end", slot.end, 0.0, 1.0)
        if start >= end:
            raise InputError(f"{name}_start", f"{start:g} must be below {name}_end ({end:g})")
        if slot.preprocessor is not None and slot.preprocessor not in PREPROCESSORS:
            raise InputError(
                f"{name}_preprocessor",
                f"must be one of {', '.join(PREPROCESSORS)}; got {slot.preprocessor!r}",
            )
        checked = ControlSlot(model, slot.image, scale, start, end, slot.preprocessor)
        used.append(CheckedSlot(index, checked, label, reference, slot.preprocessor or default_preprocessor))
    return used


def _named(field: str, model: str, family_key: str) -> tuple[str, AdapterReference | None, str]:
    """A slot's ControlNet: its label, its reference (None: the bundled one) and its default
    preprocessor, from a name for this family or a reference."""
    known = CONTROLNETS.get(model.lower())
    if known is None:
        if "/" not in model and ":" not in model:
            raise InputError(
                field,
                f"{model!r} is not a ControlNet name ({', '.join(CONTROLNETS)}) nor a reference "
                "(huggingface.co/<owner>/<repo>, an https URL of a .safetensors file, <owner>/<model>)",
            )
        reference = parse_reference(field, model)
        return reference.name, reference, "none"
    if model.lower() == BUNDLED_CONTROLNET:
        return BUNDLED_CONTROLNET, None, known.preprocessor
    repository = known.repositories.get(family_key)
    if repository is None:
        raise InputError(
            field,
            f"{model!r} has no ControlNet for this model's family here ({family_key}); the names "
            f"for it: {', '.join(_names_for(family_key))}; or give a Hugging Face repository of one",
        )
    return model.lower(), parse_reference(field, f"huggingface.co/{repository}"), known.preprocessor


def resolve_control(checked: CheckedSlot, size: tuple[int, int], canny: tuple[int, int]) -> ControlRequest:
    """A checked slot with its image fitted to the output `size` (scaled to cover it, centre-cropped)."""
    slot = checked.slot
    return ControlRequest(
        field=checked.field,
        name=checked.label,
        reference=checked.reference,
        image=ImageOps.fit(as_rgb(slot.image), size, Image.Resampling.LANCZOS),
        conditioning_scale=slot.conditioning_scale,
        start=slot.start,
        end=slot.end,
        preprocessor=checked.preprocessor,
        canny_thresholds=canny,
    )


def _names_for(family_key: str) -> list[str]:
    return [
        key
        for key, known in CONTROLNETS.items()
        if family_key in known.repositories or key == BUNDLED_CONTROLNET
    ]
