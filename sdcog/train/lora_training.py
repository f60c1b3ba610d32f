"""Training a LoRA on the UNet of a loaded pipeline from prepared images and captions.

The recipe is diffusers' own LoRA training (examples/text_to_image/train_text_to_image_lora*.py):
the VAE and text encoders frozen, their outputs computed once; rank-`lora_rank` adapters on the
UNet's attention projections (to_q, to_k, to_v, to_out.0) trained with AdamW on the noise (or
velocity, for v-prediction models) the scheduler's training objective names, at timesteps drawn
uniformly. Every random draw (latent samples, batches, noise, timesteps, the adapters' start)
comes from one generator seeded with `seed`, so the same inputs give the same LoRA on the CPU.
SDXL's UNet gets its pooled text embeddings and size conditioning, as in its pipeline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sdcog.train.dataset import TrainingImage

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "sdcog-training"


@dataclass(frozen=True)
class LoraSettings:
    max_train_steps: int = 500
    learning_rate: float = 1e-4
    lora_rank: int = 16
    train_batch_size: int = 1
    seed: int = 0


@dataclass
class TrainedLora:
    unet_layers: dict[str, torch.Tensor]
    """peft's state dict of the UNet's adapters (diffusers' names: save with `save_lora_weights`)."""
    losses: list[float] = field(default_factory=list)
    """The loss of each step, in order."""
    seconds: float = 0.0


def train_lora(
    pipeline: DiffusionPipeline,
    images: Sequence[TrainingImage],
    settings: LoraSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainedLora:
    """Train a LoRA on `pipeline.unet` (left without it when done); `on_step(step, loss)` after each
    step (it may raise to stop the training)."""
    started = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    unet, device = pipeline.unet, pipeline.device
    dtype = unet.dtype
    latents = _latents(pipeline, images, generator)
    conditions = _conditions(pipeline, [image.caption for image in images], images[0].image.size)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    torch.manual_seed(settings.seed)  # peft draws the adapters' start from torch's global generator
    unet.add_adapter(
        LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(UNET_TARGETS),
        ),
        adapter_name=ADAPTER_NAME,
    )
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()  # adapters train in float32 under a half UNet
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    losses = []
    unet.train()
    try:
        for step in range(1, settings.max_train_steps + 1):
            batch = torch.randint(0, len(images), (settings.train_batch_size,), generator=generator)
            clean = latents[batch].to(device, dtype)
            noise = torch.randn(clean.shape, generator=generator).to(device, dtype)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator
            ).to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean, noise, timesteps)
            else:
                target = noise
            predicted = unet(noisy, timesteps, **conditions.for_batch(batch, device, dtype)).sample
            loss = torch.nn.functional.mse_loss(predicted.float(), target.float())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}: lower learning_rate")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, loss.item())
        layers = {name: tensor.detach().cpu().clone() for name, tensor in _adapter_state(unet).items()}
    finally:
        unet.eval()
        unet.delete_adapters(ADAPTER_NAME)
    seconds = time.perf_counter() - started
    log.info(
        "trained a rank-%d LoRA for %d steps in %.1f s; loss %.4f -> %.4f",
        settings.lora_rank,
        settings.max_train_steps,
        seconds,
        np.mean(losses[: max(1, len(losses) // 10)]),
        np.mean(losses[-max(1, len(losses) // 10) :]),
    )
    return TrainedLora(unet_layers=layers, losses=losses, seconds=seconds)


def _adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


@torch.no_grad()
def _latents(pipeline: DiffusionPipeline, images: Sequence[TrainingImage], generator) -> torch.Tensor:
    """Each image's latents (a sample of the VAE's posterior), scaled as the UNet sees them."""
    vae = pipeline.vae
    processed = pipeline.image_processor.preprocess([image.image for image in images])
    latents = []
    for index in range(len(images)):
        encoded = vae.encode(processed[index : index + 1].to(vae.device, vae.dtype)).latent_dist
        noise = torch.randn(encoded.mean.shape, generator=generator).to(vae.device, vae.dtype)
        latents.append((encoded.mean + encoded.std * noise).cpu())
    scaled = torch.cat(latents)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (scaled - shift) * vae.config.scaling_factor


@dataclass
class _Conditions:
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def for_batch(self, batch: torch.Tensor, device, dtype) -> dict:
        arguments: dict = {"encoder_hidden_states": self.embeds[batch].to(device, dtype)}
        if self.pooled is not None:
            arguments["added_cond_kwargs"] = {
                "text_embeds": self.pooled[batch].to(device, dtype),
                "time_ids": self.time_ids.repeat(len(batch), 1).to(device, dtype),
            }
        return arguments


@torch.no_grad()
def _conditions(pipeline: DiffusionPipeline, captions: list[str], size: tuple[int, int]) -> _Conditions:
    """The captions' text embeddings (and SDXL's pooled ones and size conditioning), computed once."""
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL
        embeds, _, pooled, _ = pipeline.encode_prompt(
            captions, device=pipeline.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        width, height = size
        # SDXL's size conditioning, as its pipeline builds it: original size, crop corner, target size.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        return _Conditions(embeds.cpu(), pooled.cpu(), time_ids.cpu())
    embeds, _ = pipeline.encode_prompt(captions, pipeline.device, 1, False)
    return _Conditions(embeds.cpu())
