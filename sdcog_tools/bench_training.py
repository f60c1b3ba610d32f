"""`script/bench-training`: how fast and in how much memory the trainer trains a LoRA.

Runs `sdcog.train.lora_training.train_lora` (what `cog train` runs) on random images for
`--warmup` + `--steps` steps, on a random-weight pipeline of a real architecture (or any diffusers
directory), in the dtype and with the memory settings `cog train` uses on that device, and prints
the time per step after warm-up, images per second, peak memory, the LoRA's size, and the time a
`--target-steps` training would take, extrapolated from the timed steps:

    script/bench-training                                              # tiny-sd15, CPU, seconds
    script/bench-training --preset sd15-real-arch --resolution 256 --batch 1 --steps 3
    script/bench-training --preset sdxl-real-arch --device cuda        # the GPU target below

The GPU target (issue 19): SDXL, rank 32, batch 4, 768 px, pivotal tuning: 1,000 steps in under
8 minutes within 24 GB of GPU memory, from at least 100 timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sdcog.generate.engine import default_device
from sdcog.model.acceleration import pipeline_dtype
from sdcog.model.families import SD1, SDXL
from sdcog.train.dataset import TrainingImage
from sdcog.train.lora_training import LoraSettings, train_lora
from sdcog.train.output import diffusers_tensors
from sdcog.train.trainer import PIVOTAL_TOKENS, native_resolution, prepare_for_training
from sdcog_tools.random_pipelines import build_pipeline

TARGET_MINUTES = 8.0
TARGET_GB = 24.0


def random_images(count: int, resolution: int) -> list[TrainingImage]:
    rng = np.random.default_rng(0)
    return [
        TrainingImage(
            f"{index}.png",
            Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)),
            "a photo of TOK",
            "bench",
        )
        for index in range(count)
    ]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux: the process's peak RSS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench-training", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny-sd15", help="a random_pipelines preset (default tiny-sd15)")
    source.add_argument("--weights", type=Path, help="a diffusers pipeline directory instead")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    parser.add_argument("--resolution", type=int, help="default: 768 for SDXL, else the native size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the GPU target: 100 or more)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target-steps", type=int, default=1000)
    parser.add_argument("--no-pivotal", action="store_true", help="the LoRA alone, without the embeddings")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    started = time.perf_counter()
    if args.weights:
        pipeline = DiffusionPipeline.from_pretrained(args.weights, local_files_only=True)
        name = args.weights.name
    else:
        pipeline = build_pipeline(args.preset)
        name = args.preset
    xl = getattr(pipeline, "text_encoder_2", None) is not None
    dtype = pipeline_dtype(SDXL if xl else SD1, device)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    prepare_for_training(pipeline, device)
    built = time.perf_counter() - started
    resolution = args.resolution or native_resolution(pipeline)
    settings = LoraSettings(
        max_train_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lora_rank=args.rank,
        train_batch_size=args.batch,
        seed=0,
        pivotal_tokens=0 if args.no_pivotal else PIVOTAL_TOKENS,
    )
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(f"step {step}: {times[-1]:.3f} s, loss {loss:.4f}", file=sys.stderr)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = random_images(max(args.batch, 4), resolution)
    last[0] = time.perf_counter()
    trained = train_lora(pipeline, images, settings, on_step=on_step)
    timed = times[args.warmup :] or times
    step = float(np.mean(timed))
    lora_mb = sum(t.numel() * 4 for t in diffusers_tensors(trained.unet_layers).values()) / 1e6
    figures = {
        "model": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
        "batch": args.batch,
        "rank": args.rank,
        "pivotal_tokens": settings.pivotal_tokens,
        "build_s": round(built, 1),
        "timed_steps": len(timed),
        "step_s": round(step, 4),
        "step_s_p90": round(float(np.percentile(timed, 90)), 4),
        "images_per_s": round(args.batch / step, 3),
        "peak_memory_gb": round(peak_memory_gb(device), 2),
        "lora_parameters_m": round(sum(t.numel() for t in trained.unet_layers.values()) / 1e6, 2),
        "lora_file_mb": round(lora_mb, 1),
        f"extrapolated_{args.target_steps}_steps_min": round(step * args.target_steps / 60, 2),
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if device.type == "cuda" and xl and resolution == 768 and args.batch == 4:
        minutes, memory = figures[f"extrapolated_{args.target_steps}_steps_min"], figures["peak_memory_gb"]
        verdict = "PASS" if minutes < TARGET_MINUTES and memory <= TARGET_GB and len(timed) >= 100 else "FAIL"
        print(
            f"{verdict}: {args.target_steps} steps in {minutes} min (< {TARGET_MINUTES}), peak {memory} GB "
            f"(<= {TARGET_GB}), from {len(timed)} timed steps (>= 100)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
