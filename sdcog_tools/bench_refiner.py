"""`script/bench-refiner`: what the SDXL refiner's expert ensemble costs over the base alone
(random weights, real architectures on a GPU; tiny ones as a CPU smoke).

    script/bench-refiner --device cuda        # SDXL 1024x1024, 30 steps, 0.8: the target case
    script/bench-refiner --preset tiny-sdxl --width 256 --height 256 --steps 10   # CPU smoke

The median time of a text-to-image request through the engine (the served path: one call, then
the refiner's call on the base's latents) with refine=no_refiner and with
expert_ensemble_refiner at `--high-noise-frac`. The refiner's UNet is SDXL refiner 1.0's
architecture (2.3 B parameters) for sdxl-real-arch, tiny-sdxl-refiner's for tiny-sdxl.
Target: the ensemble costs at most 15% over the base alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from sdcog.fetch.adapter_cache import FetchedAdapters
from sdcog.generate.engine import Engine
from sdcog.generate.refiner import REFINER_ENV
from sdcog.resolve.request import resolve_request
from sdcog_tools.bench_controlnet import save_results, timed
from sdcog_tools.random_pipelines import SDXL_SCHEDULER, save_pipeline

TARGET = 0.15
REFINER_UNET = dict(  # stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json
    sample_size=128,
    block_out_channels=(384, 768, 1536, 1536),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24),
    use_linear_projection=True,
    cross_attention_dim=1280,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)


def save_real_refiner(out: Path, dtype: torch.dtype) -> Path:
    """What `script/download-weights --refiner` bakes, with random weights: model_index.json, the
    scheduler config and the UNet."""
    torch.manual_seed(0)
    UNet2DConditionModel(**REFINER_UNET).to(dtype).save_pretrained(out / "unet")
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench-refiner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sdxl-real-arch", choices=["sdxl-real-arch", "tiny-sdxl"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--high-noise-frac", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as scratch:
        base = save_pipeline(args.preset, Path(scratch) / "base", dtype=half)
        if args.preset == "tiny-sdxl":
            refiner = save_pipeline("tiny-sdxl-refiner", Path(scratch) / "refiner")
        else:
            refiner = save_real_refiner(Path(scratch) / "refiner", half)
        with mock.patch.dict(os.environ, {REFINER_ENV: str(refiner)}):
            engine = Engine.load(base, device)

    def request(refine: str):
        return resolve_request(
            engine.limits,
            prompt="an astronaut riding a horse",
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            seed=1,
            refine=refine,
            high_noise_frac=args.high_noise_frac,
        )

    base_s = timed(engine, request("no_refiner"), FetchedAdapters(), args.reps)
    ensemble_s = timed(engine, request("expert_ensemble_refiner"), FetchedAdapters(), args.reps)
    added = (ensemble_s - base_s) / base_s
    results = {
        "preset": args.preset,
        "device": str(device),
        "size": [args.width, args.height],
        "steps": args.steps,
        "high_noise_frac": args.high_noise_frac,
        "base_s": round(base_s, 3),
        "expert_ensemble_s": round(ensemble_s, 3),
        "added": round(added, 4),
        "target": TARGET,
        "verdict": "PASS" if added <= TARGET else "FAIL",
    }
    print(json.dumps(results, indent=2))
    save_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
