"""Train the bundled model: a small Stable Diffusion (CLIP text encoder, cross-attention UNet,
AutoencoderKL with 8x downsampling, the SD 1.5 scheduler) on the procedural shapes world.

Two phases, both on procedurally drawn batches (nothing is downloaded or stored):
1. the VAE learns to reconstruct 64x64 scenes through 8x8x4 latents (MSE + a small KL term);
2. with the VAE frozen, the UNet and the text encoder learn to denoise those latents (epsilon
   prediction, DDPM noise schedule), with 10% of captions dropped so classifier-free guidance works.

    script/train-bundled-model [--out models/shapes-sd] [--vae-steps N] [--unet-steps N] [--seed S]

It prints its training curve and saves it (loss per logged step) next to the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel

from sdcog.random_pipelines import SD15_SCHEDULER, _text_config, _vae, make_tokenizer
from sdcog.shapes import IMAGE_SIZE, TRAIN_SCENES, render
from sdcog.weights import PROJECT_ROOT

BUNDLED_MODEL_DIR = PROJECT_ROOT / "models" / "shapes-sd"
CAPTION_DROPOUT = 0.1


def _batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [rng.choice(TRAIN_SCENES) for _ in range(size)]
    pixels = np.stack([np.asarray(render(scene, rng), dtype=np.float32) for scene in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [scene.caption for scene in scenes]


def _log(phase: str, step: int, total: int, loss: float, started: float, curve: list) -> None:
    curve.append(
        {
            "phase": phase,
            "step": step,
            "loss": round(loss, 5),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    print(
        f"{phase} step {step:>6}/{total}  loss {loss:.5f}  {time.perf_counter() - started:7.1f} s", flush=True
    )


def train_vae(
    steps: int, rng: random.Random, curve: list, device: str, batch_size: int = 16
) -> AutoencoderKL:
    vae = _vae((16, 32, 32, 32), norm_num_groups=8, sample_size=IMAGE_SIZE, layers_per_block=1).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    started, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        images = _batch(rng, batch_size)[0].to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 1 else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps:
            _log("vae", step, steps, running, started, curve)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(_batch(rng, 64)[0].to(device)).latent_dist.mean for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def train_unet(
    vae: AutoencoderKL,
    steps: int,
    rng: random.Random,
    curve: list,
    device: str,
    lr: float,
    batch_size: int = 32,
) -> tuple[UNet2DConditionModel, CLIPTextModel, object]:
    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(
        _text_config(
            tokenizer, None, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder.to(device)
    unet.to(device)
    noise_schedule = DDPMScheduler.from_config(SD15_SCHEDULER)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    started, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        images, captions = _batch(rng, batch_size)
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption for caption in captions]
        with torch.no_grad():
            latents = vae.encode(images.to(device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), device=device)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        tokens = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        hidden = text_encoder(tokens.input_ids.to(device))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            _log("unet", step, steps, running, started, curve)
    return unet.eval(), text_encoder.eval(), tokenizer


def measure_adherence(model_dir: Path, seeds: tuple[int, ...] = (0, 1), steps: int = 30) -> float:
    """The share of held-out prompts whose image shows the asked colour and shape (by `judge`)."""
    from sdcog.engine import Engine
    from sdcog.request import resolve_request
    from sdcog.shapes import HELD_OUT_SCENES, judge

    engine = Engine.load(model_dir)
    hits = total = 0
    for scene in HELD_OUT_SCENES:
        request = resolve_request(
            engine.limits,
            prompt=scene.caption,
            seed=seeds[0],
            num_outputs=len(seeds),
            num_inference_steps=steps,
        )
        for image in engine.generate(request):
            hits += judge(image).matches(scene)
            total += 1
    return hits / total


MODEL_CARD = """# shapes-sd: the bundled model

A small Stable Diffusion (diffusers `StableDiffusionPipeline`: CLIP text encoder, cross-attention
UNet, AutoencoderKL with 8x downsampling, the SD 1.5 PNDM scheduler config) trained from scratch
by `script/train-bundled-model` on a procedural world: one coloured shape on a coloured background,
64x64 pixels, captioned like "a red circle on a blue background".

- Colours: red, green, blue, yellow, purple, orange, white, black. Shapes: circle, square, triangle.
- One colour/shape/background combination in five is held out of training (`sdcog.shapes`), so
  prompt adherence is measured on prompts the model never saw.
- Native size 64x64 (8x8x4 latents). Trained with seed {seed}: {vae_steps} VAE steps, then
  {unet_steps} UNet + text-encoder steps (10% caption dropout), in {minutes:.0f} minutes on this machine.
- It follows prompts in its tiny world and nothing else: it is the project's offline default and
  test oracle, not a general image model. `training_curve.json` holds the loss curve.
"""


def train(
    out: Path, vae_steps: int, unet_steps: int, seed: int, device: str = "cpu", lr: float = 1e-3
) -> Path:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    started = time.perf_counter()
    curve: list = []
    vae = train_vae(vae_steps, rng, curve, device)
    unet, text_encoder, tokenizer = train_unet(vae, unet_steps, rng, curve, device, lr)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to("cpu").save_pretrained(out, safe_serialization=True)
    minutes = (time.perf_counter() - started) / 60
    (out / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    (out / "README.md").write_text(
        MODEL_CARD.format(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, minutes=minutes)
    )
    print(f"saved {out} after {minutes:.1f} minutes", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/train-bundled-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet phase")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the reference run used 2)")
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda, for experiments")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.vae_steps, args.unet_steps, args.seed, args.device, args.lr)
    print(f"prompt adherence on held-out prompts: {measure_adherence(args.out):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
