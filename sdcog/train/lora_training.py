"""Training a LoRA on the UNet of a loaded pipeline from prepared images and captions.

The recipe is diffusers' own LoRA training (examples/text_to_image/train_text_to_image_lora*.py):
the VAE and text encoders frozen, their outputs computed once; rank-`lora_rank` adapters on the
UNet's attention projections (to_q, to_k, to_v, to_out.0) trained with AdamW on the noise (or
velocity, for v-prediction models) the scheduler's training objective names, at timesteps drawn
uniformly. Every random draw (latent samples, batches, noise, timesteps, the adapters' start)
comes from one generator seeded with `seed`, so the same inputs give the same LoRA on the CPU.
SDXL's UNet gets its pooled text embeddings and size conditioning, as in its pipeline.

Pivotal tuning (`pivotal_tokens` > 0), as in Replicate's SDXL trainer: the trigger word in the
captions stands for that many new tokens, whose input embeddings (one set per text encoder) are
trained alongside the LoRA at `ti_learning_rate`, starting from random vectors of the size of the
existing ones. Only their rows change (the other rows get no gradient and no weight decay); the
captions are then encoded at every step, through the text encoders, instead of once. The new
tokens are the embedding slots the engine uses at inference (`TextualInversions`), so training
adds nothing to the pipeline that it keeps: the slots are zeros again when it returns.
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

from sdcog.generate.embeddings import ActiveEmbeddings, AppliedEmbedding, TextualInversions
from sdcog.train.dataset import DEFAULT_TRIGGER_WORD, TrainingImage

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
    pivotal_tokens: int = 0
    """New tokens the trigger word stands for, trained as textual inversion; 0: none."""
    ti_learning_rate: float = 3e-4
    trigger_word: str = DEFAULT_TRIGGER_WORD


@dataclass
class TrainedLora:
    unet_layers: dict[str, torch.Tensor]
    """peft's state dict of the UNet's adapters (diffusers' names: save with `save_lora_weights`)."""
    losses: list[float] = field(default_factory=list)
    """The loss of each step, in order."""
    seconds: float = 0.0
    embeddings: tuple[torch.Tensor, ...] = ()
    """With pivotal tuning: the trigger word's vectors, `pivotal_tokens` x width, one per text encoder."""


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
    size = images[0].image.size
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    pivotal = _PivotalTokens(pipeline, settings, generator) if settings.pivotal_tokens else None
    captions = [image.caption if pivotal is None else pivotal.expand(image.caption) for image in images]
    fixed = None if pivotal else _conditions(pipeline, captions, size)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
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
    groups = [{"params": trainable, "lr": settings.learning_rate}]
    if pivotal is not None:
        groups += pivotal.parameter_groups()
    optimizer = _optimizer(groups)
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
            if fixed is not None:
                condition = fixed.for_batch(batch, device, dtype)
            else:
                encoded = _conditions(pipeline, [captions[index] for index in batch], size, grad=True)
                condition = encoded.for_batch(torch.arange(len(batch)), device, dtype)
            predicted = unet(noisy, timesteps, **condition).sample
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
        embeddings = () if pivotal is None else pivotal.vectors()
    finally:
        unet.eval()
        unet.delete_adapters(ADAPTER_NAME)
        if pivotal is not None:
            pivotal.restore()
    seconds = time.perf_counter() - started
    log.info(
        "trained a rank-%d LoRA for %d steps in %.1f s; loss %.4f -> %.4f",
        settings.lora_rank,
        settings.max_train_steps,
        seconds,
        np.mean(losses[: max(1, len(losses) // 10)]),
        np.mean(losses[-max(1, len(losses) // 10) :]),
    )
    return TrainedLora(unet_layers=layers, losses=losses, seconds=seconds, embeddings=embeddings)


def _optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW in float32. 8-bit Adam (bitsandbytes), which full fine-tunes use to save memory, would
    save under 0.5 GB here: a rank-32 LoRA of SDXL's UNet has about 46M parameters, whose optimizer
    state is 0.4 GB in float32. The embeddings' group has no weight decay: rows without gradient
    must not move."""
    return torch.optim.AdamW(groups)


class _PivotalTokens:
    """The trigger word's new tokens in the text encoders, trained as textual inversion."""

    def __init__(self, pipeline: DiffusionPipeline, settings: LoraSettings, generator: torch.Generator):
        self.count = settings.pivotal_tokens
        self.learning_rate = settings.ti_learning_rate
        self.slots = TextualInversions(pipeline, slots=self.count)
        tokens = " ".join(self.slots.slots)
        placeholder = AppliedEmbedding(settings.trigger_word, "", self.count)
        self.active = ActiveEmbeddings({settings.trigger_word.lower(): (placeholder, tokens)})
        self.encoders = [encoder for _, encoder in self.slots.encoders]
        self._dtypes = [encoder.dtype for encoder in self.encoders]
        for encoder in self.encoders:
            encoder.float()  # the vectors train in float32, as the adapters do
        self.weights = [encoder.get_input_embeddings().weight for encoder in self.encoders]
        self.rows = [
            torch.tensor(ids, device=weight.device)
            for ids, weight in zip(self.slots.slot_ids, self.weights, strict=True)
        ]
        self._hooks = []
        for weight, rows in zip(self.weights, self.rows, strict=True):
            with torch.no_grad():
                scale = weight.std().item()
                start = torch.randn((self.count, weight.shape[1]), generator=generator) * scale
                weight[rows] = start.to(weight.device)
            weight.requires_grad_(True)
            mask = torch.zeros((weight.shape[0], 1), device=weight.device)
            mask[rows] = 1
            self._hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask))

    def expand(self, caption: str) -> str:
        """The caption with the trigger word replaced by the new tokens (a caption without it gets
        none: it trains the LoRA only)."""
        return self.active.expand(caption)

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.weights, "lr": self.learning_rate, "weight_decay": 0.0}]

    def vectors(self) -> tuple[torch.Tensor, ...]:
        return tuple(
            weight[rows].detach().cpu().float().clone()
            for weight, rows in zip(self.weights, self.rows, strict=True)
        )

    def restore(self) -> None:
        """The slots back to zeros, the encoders frozen and in their dtype."""
        for hook in self._hooks:
            hook.remove()
        for weight, rows in zip(self.weights, self.rows, strict=True):
            weight.requires_grad_(False)
            with torch.no_grad():
                weight[rows] = 0
        for encoder, dtype in zip(self.encoders, self._dtypes, strict=True):
            encoder.to(dtype)


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


def _conditions(
    pipeline: DiffusionPipeline, captions: list[str], size: tuple[int, int], grad: bool = False
) -> _Conditions:
    """The captions' text embeddings (and SDXL's pooled ones and size conditioning); with `grad`,
    differentiable (for the trigger word's vectors)."""
    with torch.set_grad_enabled(grad):
        return _encoded(pipeline, captions, size)


def _encoded(pipeline: DiffusionPipeline, captions: list[str], size: tuple[int, int]) -> _Conditions:
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL
        embeds, _, pooled, _ = pipeline.encode_prompt(
            captions, device=pipeline.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        width, height = size
        # SDXL's size conditioning, as its pipeline builds it: original size, crop corner, target size.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        return _Conditions(embeds, pooled, time_ids)
    embeds, _ = pipeline.encode_prompt(captions, pipeline.device, 1, False)
    return _Conditions(embeds)
