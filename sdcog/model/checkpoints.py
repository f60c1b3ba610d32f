"""Single-file checkpoints: what one is, read from its tensors, before anything is loaded.

Most Stable Diffusion models are published as one `.safetensors` file in the layout AUTOMATIC1111
and ComfyUI load (UNet under `model.diffusion_model.`, VAE under `first_stage_model.`, the text
encoders under `cond_stage_model.` or `conditioner.embedders.`). `inspect_checkpoint` reads only
the file's header (names, shapes, metadata) and decides, saying why each time:

- the family, from the text encoders' names: `conditioner.embedders.1.model.` (OpenCLIP bigG) is
  SDXL base, `cond_stage_model.model.` (OpenCLIP ViT-H) SD 2.x, `cond_stage_model.transformer.`
  (CLIP ViT-L) SD 1.x; a file without text encoders by the UNet's cross-attention width (768, 1024,
  2048). An SDXL refiner (`conditioner.embedders.0.model.` alone) is refused, saying how refiners
  are served;
- inpainting, from the UNet's first convolution: 9 input channels (latents, mask, masked image);
- the prediction type, from the first of: a `v_pred` tensor in the file (AUTOMATIC1111's marker),
  the file's metadata (`modelspec.prediction_type`, or a `modelspec.architecture` ending in `-v`),
  the setting (`SDCOG_PREDICTION_TYPE`, or `prediction_type` in sdcog-source.json that
  `script/download-weights --prediction-type` writes), the scheduler config beside the file, else
  epsilon;
- the few-step kind (sdcog/resolve/few_step.py), from the first of: the file's metadata
  (`modelspec.title`, `modelspec.description`), the setting (`SDCOG_FEW_STEP`, or `few_step` in
  sdcog-source.json), an LCMScheduler config beside the file, the file's name, else none.

Pickle checkpoints (`.ckpt`, `.pt`, `.bin`, or such bytes under any name) are refused without
being opened: unpickling runs whatever code the file holds. A truncated file, and a file that is
another kind of weights (a LoRA, a ControlNet, a VAE, an embedding), are refused naming it.

The configs and tokenizers of the family (diffusers' layout without weights) sit beside the file:
`script/download-weights` fetches them once from `config_repository`; setup never reaches a hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdcog.model.families import SD1, SD2, SDXL, ModelFamily
from sdcog.model.safetensors_files import NotSafetensors, described_size, read_header
from sdcog.model.weights import SOURCE_FILE, WEIGHTS_SUFFIX, WeightsError, json_problem, read_source
from sdcog.resolve.few_step import FewStep, few_step_from_name, parse_setting

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
VAE_SUFFIX = ".vae.safetensors"
"""AUTOMATIC1111's name for a VAE kept beside a checkpoint (`<model>.vae.safetensors`)."""
PREDICTION_SETTING = "SDCOG_PREDICTION_TYPE"
FEW_STEP_SETTING = "SDCOG_FEW_STEP"
PREDICTION_TYPES = ("epsilon", "v_prediction")
INPAINTING_CHANNELS = 9
"""An inpainting UNet's input: 4 latent channels, the mask, 4 of the masked image's latents."""

UNET = "model.diffusion_model."
VAE = "first_stage_model."
UNET_INPUT = UNET + "input_blocks.0.0.weight"
_TEXT_ENCODERS = (
    ("conditioner.embedders.1.model.", SDXL, "conditioner.embedders.1 (OpenCLIP ViT-bigG): SDXL base's"),
    ("cond_stage_model.model.", SD2, "cond_stage_model.model (OpenCLIP ViT-H): SD 2.x's"),
    ("cond_stage_model.transformer.", SD1, "cond_stage_model.transformer (CLIP ViT-L): SD 1.x's"),
)
_REFINER_TEXT = "conditioner.embedders.0.model."
_CONTEXT_WIDTHS = {768: SD1, 1024: SD2, 2048: SDXL}

CONFIG_REPOSITORIES: dict[tuple[str, bool, str], str] = {
    # (family, inpainting, prediction type or few-step kind) -> a diffusers repository whose
    # configs and tokenizers fit; "*" matches any.
    ("sd1", False, "*"): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("sd1", True, "*"): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("sd2", False, "epsilon"): "stabilityai/stable-diffusion-2-1-base",
    ("sd2", False, "v_prediction"): "stabilityai/stable-diffusion-2-1",
    ("sd2", False, "turbo"): "stabilityai/sd-turbo",
    ("sd2", True, "*"): "stabilityai/stable-diffusion-2-inpainting",
    ("sdxl", False, "*"): "stabilityai/stable-diffusion-xl-base-1.0",
    ("sdxl", False, "turbo"): "stabilityai/sdxl-turbo",
    ("sdxl", True, "*"): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    family: ModelFamily
    inpainting: bool
    prediction_type: str
    few_step: FewStep | None
    reasons: Mapping[str, str]
    """Why each of family, inpainting, prediction_type and few_step was decided."""

    @property
    def config_repository(self) -> str:
        """The hub repository whose configs and tokenizers fit (what download-weights fetches)."""
        kind = self.few_step.kind if self.few_step else None
        for key in (kind or "", self.prediction_type, "*"):
            found = CONFIG_REPOSITORIES.get((self.family.key, self.inpainting, key))
            if found:
                return found
        raise AssertionError(f"no config repository for {self.family.key}")  # the table covers all

    def describe(self) -> str:
        few_step = self.few_step.label if self.few_step else "no"
        return (
            f"{self.family.label} ({self.reasons['family']}); "
            f"inpainting: {'yes' if self.inpainting else 'no'} ({self.reasons['inpainting']}); "
            f"prediction: {self.prediction_type} ({self.reasons['prediction_type']}); "
            f"few-step: {few_step} ({self.reasons['few_step']})"
        )


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def looks_like_pickle(path: Path) -> bool:
    """A pickle checkpoint by its name or by its first bytes (torch's zip container, or a pickle)."""
    if is_pickle_name(path.name):
        return True
    try:
        with path.open("rb") as file:
            return is_pickle_start(file.read(4))
    except OSError:
        return False


def is_pickle_start(start: bytes) -> bool:
    """Bytes a pickle file starts with: torch's zip container, or a pickle's protocol 2-5 opcode."""
    return start.startswith(b"PK\x03\x04") or (
        len(start) >= 2 and start[0] == 0x80 and start[1] in range(2, 6)
    )


def pickle_error(path: Path) -> WeightsError:
    return WeightsError(
        f"{path} is a pickle checkpoint: loading one runs whatever code it holds, so it is never "
        "loaded here. Convert it once to safetensors with `script/convert-checkpoint "
        f"{path}` (it reads tensors only: torch.load with weights_only=True refuses code), "
        "or download the .safetensors version most model pages also publish."
    )


def find_checkpoint(directory: Path, source: Mapping[str, object]) -> Path | None:
    """The single-file checkpoint a weights directory serves: the one sdcog-source.json names,
    else the one `.safetensors` file at its top level (VAEs `*.vae.safetensors` aside); None when
    it has none, or is a diffusers pipeline with its UNet's weights. Pickles there are refused,
    several files too."""
    named = source.get("checkpoint")
    if isinstance(named, str) and named:
        return directory / named
    if any((directory / "unet").glob(f"*{WEIGHTS_SUFFIX}")):
        return None  # a whole diffusers pipeline (hub repos often hold its single file beside it)
    candidates = sorted(
        path
        for path in directory.glob(f"*{WEIGHTS_SUFFIX}")
        if not path.name.endswith(VAE_SUFFIX) and not path.name.startswith(".")
    )
    if len(candidates) > 1:
        raise WeightsError(
            f"{directory} holds several checkpoints ({', '.join(path.name for path in candidates)}): "
            f'keep one, or name it in {SOURCE_FILE} as "checkpoint".'
        )
    if candidates:
        return candidates[0]
    pickles = sorted(path for path in directory.iterdir() if is_pickle_name(path.name) and path.is_file())
    if pickles and not (directory / "unet").is_dir():
        raise pickle_error(pickles[0])
    return None


def _tensor_entries(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The tensors' shapes and the metadata of a whole safetensors file; WeightsError otherwise."""
    if looks_like_pickle(path):
        raise pickle_error(path)
    try:
        length, header = read_header(path)
    except NotSafetensors as error:
        raise WeightsError(
            f"{path} is not a safetensors checkpoint ({error}): an error page or another format "
            "saved under the name? Download it again."
        ) from error
    try:
        expected = described_size(length, header)
    except NotSafetensors as error:
        raise WeightsError(f"{path}: {error}: a damaged file") from error
    metadata = header.pop("__metadata__", None) or {}
    shapes = {name: list(entry.get("shape", [])) for name, entry in header.items()}
    size = path.stat().st_size
    if size != expected:
        raise WeightsError(
            f"{path} is {'truncated' if size < expected else 'longer than its header says'}: "
            f"{size:,} bytes, its header describes {expected:,} (an interrupted download?). "
            "Download it again."
        )
    return shapes, {str(key): str(value) for key, value in metadata.items()}


def _what_else(shapes: Mapping[str, list[int]]) -> str:
    """What a file without a Stable Diffusion UNet is, for the refusal."""
    names = list(shapes)
    if any("lora_" in name or ".lora_down." in name or ".lora_A." in name for name in names):
        return "a LoRA: give it in lora_weights instead"
    if any(name.startswith(("control_model.", "controlnet_cond_embedding.")) for name in names):
        return "a ControlNet: give it in controlnet_1 instead"
    if any(
        name in ("emb_params", "clip_l", "clip_g") or name.startswith("string_to_param") for name in names
    ):
        return "a textual-inversion embedding: give it in embeddings instead"
    if "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes:
        return "a VAE alone: set VAE_WEIGHTS to it, beside a checkpoint"
    if "conv_in.weight" in shapes and any(name.startswith("down_blocks.") for name in names):
        return "a diffusers-format UNet alone: serve the whole pipeline folder (with model_index.json)"
    if any(
        name.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.double_blocks."))
        for name in names
    ):
        return "a transformer (Flux / SD3-style) model, which this Stable Diffusion server does not serve"
    sample = ", ".join(names[:3])
    return f"no Stable Diffusion UNet ({UNET_INPUT} is missing; {len(names)} tensors such as {sample})"


def _family(path: Path, shapes: Mapping[str, list[int]]) -> tuple[ModelFamily, str]:
    for prefix, family, why in _TEXT_ENCODERS:
        if any(name.startswith(prefix) for name in shapes):
            return family, f"{why} text encoder"
    if any(name.startswith(_REFINER_TEXT) for name in shapes):
        raise WeightsError(
            f"{path} is an SDXL refiner ({_REFINER_TEXT} is its only text encoder): a refiner is not "
            "a model of its own but a second pass after an SDXL base. Serve the base model here and "
            "give the refiner to the base (REFINER_WEIGHTS / `script/download-weights --refiner`)."
        )
    widths = {
        shape[-1] for name, shape in shapes.items() if name.startswith(UNET) and "attn2.to_k.weight" in name
    }
    for width in sorted(widths):
        if width in _CONTEXT_WIDTHS:
            return _CONTEXT_WIDTHS[
                width
            ], f"no text encoder in the file; the UNet's cross-attention is {width} wide"
    raise WeightsError(
        f"{path} has a UNet but no text encoder this server knows (no cond_stage_model. or "
        f"conditioner.embedders. tensors) and a cross-attention width of {sorted(widths) or 'none'}: "
        "not SD 1.x (768), SD 2.x (1024) or SDXL (2048)"
    )


def _beside(directory: Path) -> tuple[dict, dict]:
    """sdcog-source.json and the scheduler config in a weights directory (empty when absent or
    unreadable: inspect_weights names a damaged one)."""
    scheduler_file = directory / "scheduler" / "scheduler_config.json"
    scheduler = {}
    if scheduler_file.is_file() and json_problem(scheduler_file) is None:
        scheduler = json.loads(scheduler_file.read_text(encoding="utf-8"))
    return read_source(directory)[0], scheduler if isinstance(scheduler, dict) else {}


def _setting(
    environ: Mapping[str, str], source: Mapping[str, object], env: str, key: str
) -> tuple[str, str] | None:
    if environ.get(env, "").strip():
        return environ[env].strip(), f"the {env} setting"
    value = source.get(key)
    if isinstance(value, str) and value.strip():
        return value.strip(), f'"{key}" in {SOURCE_FILE} (script/download-weights --{key.replace("_", "-")})'
    return None


def _prediction_type(
    shapes: Mapping, metadata: Mapping[str, str], setting: tuple[str, str] | None, scheduler: Mapping
) -> tuple[str, str]:
    if "v_pred" in shapes:
        return "v_prediction", "a v_pred key in the file"
    declared = metadata.get("modelspec.prediction_type", "").lower()
    if declared:
        kind = "v_prediction" if declared.startswith("v") else "epsilon"
        return kind, f"the file's metadata (modelspec.prediction_type={declared})"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.endswith("-v") or "-v-" in architecture:
        return "v_prediction", f"the file's metadata (modelspec.architecture={architecture})"
    if setting:
        value, why = setting
        if value not in PREDICTION_TYPES:
            raise WeightsError(f"{why} is {value!r}; choose {' or '.join(PREDICTION_TYPES)}")
        return value, why
    if scheduler.get("prediction_type") in PREDICTION_TYPES:
        return scheduler["prediction_type"], "the scheduler config beside the file"
    return "epsilon", f"no marker in the file and no {PREDICTION_SETTING} setting: the default"


def _few_step(
    path: Path, metadata: Mapping[str, str], setting: tuple[str, str] | None, scheduler: Mapping
) -> tuple[FewStep | None, str]:
    for key in ("modelspec.title", "modelspec.description"):
        kind = few_step_from_name(metadata.get(key, ""))
        if kind:
            return kind, f"the file's metadata ({key})"
    if setting:
        value, why = setting
        try:
            return parse_setting(why, value), why
        except ValueError as error:
            raise WeightsError(str(error)) from error
    if scheduler.get("_class_name") == "LCMScheduler":
        return few_step_from_name("lcm"), "the LCMScheduler config beside the file"
    kind = few_step_from_name(path.name)
    if kind:
        return kind, f"the file's name ({path.name})"
    return None, f"no marker, no {FEW_STEP_SETTING} setting"


def folder_few_step(directory: Path, environ: Mapping[str, str] = os.environ) -> tuple[FewStep | None, str]:
    """A diffusers folder's few-step kind, by the rules for a file without metadata: the setting,
    an LCMScheduler config, then the name it was downloaded by (e.g. stabilityai/sdxl-turbo)."""
    source, scheduler = _beside(directory)
    name = str(source.get("model_id") or directory.resolve().name)
    setting = _setting(environ, source, FEW_STEP_SETTING, "few_step")
    return _few_step(Path(name.replace("/", "--")), {}, setting, scheduler)


def inspect_checkpoint(path: Path, environ: Mapping[str, str] = os.environ) -> CheckpointInfo:
    """What the single-file checkpoint at `path` is (its header only is read), or WeightsError
    naming the file and what was found instead."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    shapes, metadata = _tensor_entries(path)
    if UNET_INPUT not in shapes:
        raise WeightsError(f"{path} is not a Stable Diffusion checkpoint: it is {_what_else(shapes)}.")
    family, family_reason = _family(path, shapes)
    channels = shapes[UNET_INPUT][1] if len(shapes[UNET_INPUT]) > 1 else None
    if channels not in (4, INPAINTING_CHANNELS):
        raise WeightsError(
            f"{path}: its UNet takes {channels} input channels, not 4 (text-to-image) or 9 "
            "(inpainting): another kind of model (an upscaler or a depth-to-image model?)"
        )
    source, scheduler = _beside(path.parent)
    prediction_type, prediction_reason = _prediction_type(
        shapes, metadata, _setting(environ, source, PREDICTION_SETTING, "prediction_type"), scheduler
    )
    few_step, few_step_reason = _few_step(
        path, metadata, _setting(environ, source, FEW_STEP_SETTING, "few_step"), scheduler
    )
    return CheckpointInfo(
        path=path,
        family=family,
        inpainting=channels == INPAINTING_CHANNELS,
        prediction_type=prediction_type,
        few_step=few_step,
        reasons={
            "family": family_reason,
            "inpainting": f"the UNet's first convolution takes {channels} channels",
            "prediction_type": prediction_reason,
            "few_step": few_step_reason,
        },
    )


def check_configs_fit(info: CheckpointInfo, config_family: ModelFamily, unet_config: Mapping) -> None:
    """Refuse configs beside the checkpoint that are for another family or variant (a mislabel)."""
    problems = []
    if config_family is not info.family:
        problems.append(f"they are for {config_family.label}, the file is {info.family.label}")
    channels = unet_config.get("in_channels")
    expected = INPAINTING_CHANNELS if info.inpainting else 4
    if channels != expected:
        problems.append(
            f"their UNet takes {channels} channels, the file's {expected}"
            f" ({'an inpainting' if info.inpainting else 'a text-to-image'} model)"
        )
    if problems:
        raise WeightsError(
            f"The configs beside {info.path} (model_index.json, unet/config.json) do not fit it: "
            f"{'; '.join(problems)}. Fetch the right ones with `script/download-weights` for this file, "
            f"or those of {info.config_repository}."
        )
