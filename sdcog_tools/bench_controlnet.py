"""`script/bench-controlnet`: what one ControlNet adds to a generation, against its share of the
compute, for a full-size ControlNet (diffusers' `from_unet`: the UNet's whole encoder) and a small
one (one transformer layer per block; SDXL's encoder has 1, 2 and 10), random weights.

    script/bench-controlnet --preset sdxl-real-arch --device cuda          # the issue's target case
    script/bench-controlnet [--preset tiny-sdxl] [--width 1024 --height 1024] [--steps 30] [--reps 3]

For each: the median time of a text-to-image request through the engine (the served path) without
and with the ControlNet, the added time as a share of the base, and the ControlNet's FLOPs per
denoising step as a share of the UNet's (torch's FlopCounterMode, one step at the request's size,
both halves of classifier-free guidance). Target: added share <= FLOPs share + 10 points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from sdcog.fetch.adapter_cache import FetchedAdapters
from sdcog.fetch.control_maps import ControlMaps
from sdcog.generate.controlnets import LoadedControlNet
from sdcog.generate.engine import Engine
from sdcog.resolve.control import ControlSlot
from sdcog.resolve.request import resolve_request
from sdcog_tools.random_pipelines import random_controlnet, save_pipeline

TARGET_MARGIN = 0.10


def architectures(unet) -> dict[str, torch.nn.Module]:
    blocks = len(unet.config.block_out_channels)
    return {
        "full": random_controlnet(unet, seed=1),
        "small": random_controlnet(unet, seed=2, transformer_layers_per_block=[1] * blocks),
    }


def flops_per_step(engine: Engine, controlnet, width: int, height: int) -> tuple[float, float]:
    """FLOPs of one UNet call and of one ControlNet call at this size (CFG batch of 2)."""
    unet = engine.pipeline.unet
    scale = engine.pipeline.vae_scale_factor
    latents = torch.randn(
        2, unet.config.in_channels, height // scale, width // scale, device=engine.device, dtype=unet.dtype
    )
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device=engine.device, dtype=unet.dtype)
    step = torch.tensor([500, 500], device=engine.device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, pooled, device=engine.device, dtype=unet.dtype),
                "time_ids": torch.randn(2, 6, device=engine.device, dtype=unet.dtype),
            }
        }
    control = torch.rand(2, 3, height, width, device=engine.device, dtype=unet.dtype)
    counts = []
    with torch.no_grad():
        for call in (
            lambda: unet(latents, step, hidden, **extra),
            lambda: controlnet(latents, step, hidden, control, **extra),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def timed(engine: Engine, request, adapters: FetchedAdapters, reps: int) -> float:
    engine.generate(request, adapters=adapters)  # warm-up
    times = []
    for _ in range(reps):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate(request, adapters=adapters)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench-controlnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-sdxl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        weights = save_pipeline(args.preset, Path(scratch) / args.preset)
        engine = Engine.load(weights, torch.device(args.device))
    control_image = Image.new("RGB", (args.width, args.height))
    ImageDraw.Draw(control_image).rectangle(
        (args.width // 4, args.height // 4, args.width // 2, args.height // 2), outline="white", width=4
    )

    def request(*slots: ControlSlot):
        # preprocessor none: the map is the image
        return ControlMaps().prepare(
            resolve_request(
                engine.limits,
                prompt="a red circle",
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                seed=1,
                controlnets=slots,
            )
        )

    base_s = timed(engine, request(), FetchedAdapters(), args.reps)
    print(
        f"{args.preset} on {args.device}, {args.width}x{args.height}, {args.steps} steps: "
        f"base {base_s:.3f} s",
        flush=True,
    )
    results = {
        "preset": args.preset,
        "device": args.device,
        "size": [args.width, args.height],
        "steps": args.steps,
        "base_s": base_s,
    }
    failed = False
    for name, controlnet in architectures(engine.pipeline.unet).items():
        controlnet = controlnet.to(engine.device, engine.pipeline.unet.dtype)
        steered = request(ControlSlot("huggingface.co/bench/controlnet", control_image))
        adapters = FetchedAdapters(
            controlnets=(LoadedControlNet(steered.controlnets[0], controlnet, "0" * 10),)
        )
        with_s = timed(engine, steered, adapters, args.reps)
        unet_flops, controlnet_flops = flops_per_step(engine, controlnet, args.width, args.height)
        added, share = (with_s - base_s) / base_s, controlnet_flops / unet_flops
        verdict = "PASS" if added <= share + TARGET_MARGIN else "FAIL"
        failed |= verdict == "FAIL"
        parameters = sum(parameter.numel() for parameter in controlnet.parameters()) / 1e6
        print(
            f"  {name} ControlNet ({parameters:.1f} M parameters): {with_s:.3f} s, added {added:+.1%}; "
            f"its FLOPs {share:.1%} of the UNet's; target added <= {share + TARGET_MARGIN:.1%}: {verdict}",
            flush=True,
        )
        results[name] = {
            "seconds": with_s,
            "added": added,
            "flops_share": share,
            "parameters_m": parameters,
            "verdict": verdict,
        }
        del controlnet
    save_results(args.json, results)
    return 0


def save_results(path: Path | None, results: dict) -> None:
    """A bench's figures as JSON at `path` (`--json`), when given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
