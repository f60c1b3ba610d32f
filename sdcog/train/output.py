"""`trained_model.tar`: the trained LoRA in the formats the ecosystem loads, and how to use it.

- `lora.safetensors`: diffusers' format (`pipeline.load_lora_weights()`); the member this model's
  `lora_weights` reads from a Replicate-style tar, so the tar itself is a valid `lora_weights`;
- `lora-kohya.safetensors`: kohya's key names, which AUTOMATIC1111 and ComfyUI read (and diffusers
  too, through its kohya conversion);
- with pivotal tuning, the trigger word's embeddings twice: `embeddings.pti` in Replicate's
  trainers' format (`text_encoders_0`, and `text_encoders_1` for SDXL), which this model's
  `lora_weights` applies by itself, and `<trigger word>.safetensors` in AUTOMATIC1111's (`emb_params`,
  or `clip_l`/`clip_g` for SDXL), which its embeddings folder (and ComfyUI's) reads under that word;
- `special_params.json`: the trigger word and the tokens it stands for, as Replicate's trainers
  write it (`{"TOK": "<s0><s1>"}`; without pivotal tuning `{"TOK": "TOK"}`);
- `README.md`: a model card with the training inputs, the loss and a sample prompt;
- `loss.png`: the loss curve.
The tar is written beside its final name and renamed once complete: a failure leaves no half file.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from PIL import Image, ImageDraw
from safetensors.torch import save

from sdcog.train.lora_training import TrainedLora

LORA_FILE = "lora.safetensors"
KOHYA_FILE = "lora-kohya.safetensors"
PARAMS_FILE = "special_params.json"
CURVE_FILE = "loss.png"
CARD_FILE = "README.md"
EMBEDDINGS_FILE = "embeddings.pti"


def diffusers_tensors(unet_layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet adapters under diffusers' LoRA names (`unet.` + the module path + `lora_A/B`)."""
    converted = convert_state_dict_to_diffusers(dict(unet_layers))
    return {f"unet.{name}": tensor.contiguous() for name, tensor in converted.items()}


def kohya_tensors(unet_layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapters under kohya's names (`lora_unet_..._to_q.lora_down.weight` and alpha)."""
    converted = convert_state_dict_to_kohya(dict(unet_layers))
    return {f"lora_unet_{name}": tensor.contiguous() for name, tensor in converted.items()}


def loss_curve(losses: Sequence[float], width: int = 640, height: int = 320) -> Image.Image:
    """The loss per step (grey) and its running mean over a tenth of the steps (black)."""
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    values = np.asarray(losses, dtype=np.float64)
    if len(values) == 0:
        return picture
    window = max(1, len(values) // 10)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    low, high = float(values.min()), float(values.max()) or 1.0
    margin = 30

    def point(index: float, value: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * index / max(1, len(values) - 1)
        y = height - margin - (height - 2 * margin) * (value - low) / max(high - low, 1e-12)
        return x, y

    draw.line([point(i, v) for i, v in enumerate(values)], fill=(180, 180, 180), width=1)
    draw.line([point(i + window - 1, v) for i, v in enumerate(smooth)], fill=(0, 0, 0), width=2)
    draw.text((margin, 8), f"loss over {len(values)} steps: {low:.4f} to {high:.4f}", fill=(0, 0, 0))
    return picture


def embeddings_tensors(vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replicate's format: one tensor per text encoder, `text_encoders_<i>`, tokens x width."""
    return {f"text_encoders_{index}": tensor.contiguous() for index, tensor in enumerate(vectors)}


def automatic1111_embedding(vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """AUTOMATIC1111's (and ComfyUI's) format: `emb_params`, or `clip_l` and `clip_g` for SDXL."""
    if len(vectors) == 2:
        return {"clip_l": vectors[0].contiguous(), "clip_g": vectors[1].contiguous()}
    return {"emb_params": vectors[0].contiguous()}


def special_params(trigger_word: str, tokens: int) -> dict[str, str]:
    """What the trigger word stands for: its new tokens (Replicate's `<s0><s1>`), or itself."""
    return {trigger_word: "".join(f"<s{index}>" for index in range(tokens)) or trigger_word}


def model_card(inputs: Mapping[str, object], trained: TrainedLora, trigger_word: str) -> str:
    losses = trained.losses
    embedding = f"{trigger_word}.safetensors"
    lines = [
        "# A LoRA trained with sdcog's `cog train`",
        "",
        f"Sample prompt: `a photo of {trigger_word}`",
        "",
        "Use it here: pass this tar (its URL, a data URI or the Replicate model) as `lora_weights`"
        + (
            f"; `{EMBEDDINGS_FILE}` is applied with it, under `{trigger_word}`."
            if trained.embeddings
            else "."
        ),
        f"In diffusers: `pipeline.load_lora_weights('{LORA_FILE}')`. In AUTOMATIC1111 or ComfyUI: "
        f"`{KOHYA_FILE}` in the LoRA folder"
        + (
            f", and `{embedding}` in the embeddings folder (write `{trigger_word}` in the prompt)."
            if trained.embeddings
            else "."
        ),
        "",
        "## Training inputs",
        "",
        *[f"- `{name}`: {value}" for name, value in inputs.items()],
        "",
        f"## Loss ({CURVE_FILE})",
        "",
    ]
    if losses:
        tenth = max(1, len(losses) // 10)
        first, last = np.mean(losses[:tenth]), np.mean(losses[-tenth:])
        lines.append(
            f"{len(losses)} steps in {trained.seconds:.0f} s: first tenth {first:.4f}, last tenth {last:.4f}"
        )
    return "\n".join(lines) + "\n"


def write_trained_model(
    path: Path, trained: TrainedLora, inputs: Mapping[str, object], trigger_word: str
) -> Path:
    """Write `path` (a tar) whole, or not at all."""
    curve = io.BytesIO()
    loss_curve(trained.losses).save(curve, "PNG")
    tokens = len(trained.embeddings[0]) if trained.embeddings else 0
    members = {  # lora.safetensors first: a reader that stops at the first match finds it at once
        LORA_FILE: save(diffusers_tensors(trained.unet_layers)),
        KOHYA_FILE: save(kohya_tensors(trained.unet_layers)),
    }
    if trained.embeddings:
        members[EMBEDDINGS_FILE] = save(embeddings_tensors(trained.embeddings))
        members[f"{trigger_word}.safetensors"] = save(automatic1111_embedding(trained.embeddings))
    members[PARAMS_FILE] = json.dumps(special_params(trigger_word, tokens)).encode()
    members[CARD_FILE] = model_card(inputs, trained, trigger_word).encode()
    members[CURVE_FILE] = curve.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as sink, tarfile.open(fileobj=sink, mode="w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(data))
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path
