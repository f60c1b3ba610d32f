"""Train the bundled ControlNet: where the shape goes, for the bundled shapes model.

The ControlNet reads a silhouette (the object's shape, white on black, where it should be drawn)
and steers the frozen bundled model (`models/shapes-sd`) to draw its object there. It starts as
diffusers' `ControlNetModel.from_unet` of the bundled UNet (its encoder's weights copied, its
zero convolutions at zero, as in the ControlNet paper) with a small conditioning encoder, and learns
with the bundled model's own objective (epsilon prediction, offset noise, min-SNR-5 weighting):
  - scenes are training scenes at random boxes, one box in five held out (`shapes.box_held_out`),
    so the oracle measures control on positions it never saw;
  - 20% of captions are dropped, so that the control works with classifier-free guidance and
    without a prompt;
  - the VAE, UNet and text encoder stay frozen: the gradient flows through the UNet into the
    ControlNet only.

    script/train-bundled-controlnet [--out models/shapes-controlnet] [--steps N] [--seed S]

Same seed, same thread count, same torch build: the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr

from sdcog.generate.controlnets import BUNDLED_CONTROLNET_DIR
from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog_tools.random_pipelines import SD15_SCHEDULER
from sdcog_tools.shapes import TRAIN_SCENES, box_held_out, random_box, render_at, silhouette
from sdcog_tools.training import Curve, _warmup_cosine


@dataclass(frozen=True)
class ControlRecipe:
    """Everything that decides the trained weights (with the torch build and the thread count)."""

    seed: int = 0
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    conditioning_channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    """The conditioning encoder's widths (3 stride-2 steps: 64 px to the 8x8 latents)."""
    pool: int = 8192
    """Scenes (at training boxes) encoded once; each step samples its batch from them."""
    caption_dropout: float = 0.2
    noise_offset: float = 0.1
    snr_gamma: float = 5.0


def training_box(rng: random.Random) -> tuple[int, int, int, int]:
    """A random box that is not held out."""
    while True:
        box = random_box(rng)
        if not box_held_out(box):
            return box


@dataclass
class ControlPool:
    """Encoded scenes with their silhouettes and the frozen text encoder's states of their captions."""

    mean: torch.Tensor
    std: torch.Tensor
    silhouettes: torch.Tensor
    """uint8, one channel: 255 on the object."""
    captions: list[str]

    @classmethod
    def build(cls, pipeline: StableDiffusionPipeline, size: int, rng: random.Random) -> ControlPool:
        means, stds, masks, captions = [], [], [], []
        with torch.no_grad():
            for start in range(0, size, 256):
                images = []
                for _ in range(min(256, size - start)):
                    scene, box = rng.choice(TRAIN_SCENES), training_box(rng)
                    images.append(np.asarray(render_at(scene, box), dtype=np.float32))
                    masks.append(np.asarray(silhouette(scene.shape, box))[..., 0])
                    captions.append(scene.caption)
                pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
                posterior = pipeline.vae.encode(pixels).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        return cls(torch.cat(means), torch.cat(stds), torch.from_numpy(np.stack(masks)), captions)


def _text_states(pipeline: StableDiffusionPipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = pipeline.tokenizer
    every = sorted(set(captions)) + [""]
    tokens = tokenizer(
        every, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        states = pipeline.text_encoder(tokens.input_ids)[0]
    return dict(zip(every, states, strict=True))


def train_controlnet(recipe: ControlRecipe, base: Path = BUNDLED_MODEL_DIR) -> tuple[ControlNetModel, Curve]:
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    for module in (pipeline.vae, pipeline.unet, pipeline.text_encoder):
        module.requires_grad_(False).eval()
    curve = Curve()
    pool = ControlPool.build(pipeline, recipe.pool, rng)
    states = _text_states(pipeline, pool.captions)
    scaling = pipeline.vae.config.scaling_factor
    unet = pipeline.unet
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=recipe.conditioning_channels
    )
    controlnet.train()
    noise_schedule = DDPMScheduler.from_config(SD15_SCHEDULER)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=recipe.lr, weight_decay=1e-2)
    schedule = _warmup_cosine(optimizer, recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    running = 0.0
    for step in range(1, recipe.steps + 1):
        indices = torch.randint(0, len(pool.captions), (recipe.batch,), generator=generator)
        mean, std = pool.mean[indices], pool.std[indices]
        latents = (mean + std * torch.randn_like(mean)) * scaling
        control = (pool.silhouettes[indices].float() / 255.0)[:, None].expand(-1, 3, -1, -1)
        hidden = torch.stack(
            [
                states["" if rng.random() < recipe.caption_dropout else pool.captions[index]]
                for index in indices.tolist()
            ]
        )
        noise = torch.randn_like(latents)
        noise += recipe.noise_offset * torch.randn(recipe.batch, latents.shape[1], 1, 1)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (recipe.batch,))
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        down, middle = controlnet(noisy, timesteps, hidden, control, return_dict=False)
        prediction = unet(
            noisy,
            timesteps,
            encoder_hidden_states=hidden,
            down_block_additional_residuals=down,
            mid_block_additional_residual=middle,
        ).sample
        loss = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(noise_schedule, timesteps)
        loss = (loss * torch.clamp(snr, max=recipe.snr_gamma) / snr).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe.steps:
            curve.log("controlnet", step, recipe.steps, running)
    return controlnet.eval(), curve


MODEL_CARD = """# shapes-controlnet: the bundled ControlNet

A ControlNet (diffusers `ControlNetModel`, {parameters:.2f} M parameters) for the bundled model
`models/shapes-sd`, trained by `script/train-bundled-controlnet` on 2 CPU threads in {minutes:.1f}
minutes. Its control image is a silhouette: the object's shape, white on black, where the object
should be drawn (`sdcog_tools.shapes.silhouette`). Request it as `controlnet_1: shapes-silhouette`
with the silhouette as `controlnet_1_image` (preprocessor `none`: the image already is the map).

- Recipe (`sdcog_tools.controlnet_training.ControlRecipe`): {recipe}.
- One box (position and size) in five is held out of training (`shapes.box_held_out`); the oracle
  (`tests/test_controlnet_oracle.py`) measures on those.
- Measured right after training: {measured}.
"""


def save(controlnet: ControlNetModel, curve: Curve, recipe: ControlRecipe, out: Path, measured: str) -> None:
    controlnet.save_pretrained(out, safe_serialization=True)
    (out / "training_curve.json").write_text(json.dumps(curve.points, indent=1) + "\n")
    recipe_text = ", ".join(f"{key} {value}" for key, value in dataclasses.asdict(recipe).items())
    (out / "README.md").write_text(
        MODEL_CARD.format(
            parameters=sum(parameter.numel() for parameter in controlnet.parameters()) / 1e6,
            minutes=(time.perf_counter() - curve.started) / 60,
            recipe=recipe_text,
            measured=measured,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/train-bundled-controlnet", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=BUNDLED_CONTROLNET_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=ControlRecipe.steps)
    parser.add_argument("--lr", type=float, default=ControlRecipe.lr)
    parser.add_argument("--seed", type=int, default=ControlRecipe.seed)
    parser.add_argument("--no-measure", action="store_true", help="skip the held-out measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = ControlRecipe(seed=args.seed, steps=args.steps, lr=args.lr)
    controlnet, curve = train_controlnet(recipe)
    measured = "not measured"
    save(controlnet, curve, recipe, args.out, measured)
    if not args.no_measure:
        from sdcog_tools.controlnet_oracle import measure_control

        measured = measure_control(BUNDLED_MODEL_DIR, args.out).summary()
        print(measured, flush=True)
        save(controlnet, curve, recipe, args.out, measured)
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
