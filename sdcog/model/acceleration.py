"""The fast path on a GPU: precision per family, memory layout, fused attention projections, TF32.

Applied once at load, never per request:
- half precision: float16 for SD 1.x/2.x; bfloat16 for SDXL where the GPU has it, because
  SDXL's VAE overflows in float16 (diffusers then decodes in float32: `force_upcast`), while
  bfloat16 has float32's range, so the VAE decodes in half precision too (diffusers upcasts
  only a float16 VAE). Without bfloat16
  (pre-Ampere GPUs) SDXL runs in float16 with the upcast VAE;
- PyTorch's scaled-dot-product attention (diffusers' default processor with torch 2);
- weights read from the files straight onto the GPU (`device_map`), not through a CPU copy;
- fused QKV projections (one matmul instead of three in every self-attention);
- TF32 matmuls and convolutions for whatever still runs in float32;
- VAE slicing: a batch decodes one image at a time (the engine also tiles very large sizes).
Optionally (`SDCOG_COMPILE=1`, or a torch.compile mode name) the UNet is compiled with
torch.compile and warmed up in `setup()` at the model's native size, on the thread that runs the
requests (CUDA graphs are recorded per thread). The default mode, `reduce-overhead`, replays each
denoising step as CUDA graphs: a step of SD 1.5 at 512x512 is about a thousand small kernels, so
launching them costs more than running them (measured on an H100: 3.4x faster end to end than
plain diffusers for SD 1.5, 2.5x for SDXL). `max-autotune` also autotunes the matmuls and
convolutions (minutes of compiling, not yet measured here); `max-autotune-no-cudagraphs` and
`default` keep no graphs, for GPUs short of memory. Each new shape (size, batch) compiles
and records once more on its first request. torch's portable compile cache is loaded from and saved
to `SDCOG_COMPILE_CACHE` (default: `torch-compile-cache.bin` in the weights directory), so a cache
built once on a GPU box (`SDCOG_COMPILE=1 script/predict ...`) ships in the image with the weights
and later cold boots skip the minutes of autotuning.
On the CPU the model runs in float32 with none of this (`fast_path_settings` is empty), so the
project works anywhere. The numerics of the layout and fusion changes are checked on the CPU
(tests/test_acceleration.py); their speed only shows on a GPU (`script/bench --device cuda`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from sdcog.model.families import SDXL, ModelFamily

log = logging.getLogger(__name__)

COMPILE_ENV = "SDCOG_COMPILE"
COMPILE_CACHE_ENV = "SDCOG_COMPILE_CACHE"
COMPILE_CACHE_FILE = "torch-compile-cache.bin"


COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default")
DEFAULT_COMPILE_MODE = COMPILE_MODES[0]


def compile_mode(environ: Mapping[str, str] = os.environ) -> str | None:
    """The torch.compile mode `SDCOG_COMPILE` asks for, or None (unset, empty, 0, false, no)."""
    value = environ.get(COMPILE_ENV, "").strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return None
    if value in {"1", "true", "yes", "on"}:
        return DEFAULT_COMPILE_MODE
    if value not in COMPILE_MODES:
        raise ValueError(f"{COMPILE_ENV}={value!r}: use 1 or one of {', '.join(COMPILE_MODES)}")
    return value


def compile_cache_path(weights_dir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(COMPILE_CACHE_ENV) or Path(weights_dir) / COMPILE_CACHE_FILE)


def compile_unet(pipeline: DiffusionPipeline, cache: Path, mode: str = DEFAULT_COMPILE_MODE) -> bool:
    """Compile the UNet in place, with torch's compile cache from `cache` if it exists (returned)."""
    loaded = cache.is_file()
    if loaded:
        torch.compiler.load_cache_artifacts(cache.read_bytes())
    # CUDA graphs are a GPU thing; on the CPU (tests) the mode without them compiles the same code.
    if pipeline.device.type != "cuda" and mode in {"max-autotune", "reduce-overhead"}:
        mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
    pipeline.unet.compile(mode=mode)
    return loaded


def save_compile_cache(cache: Path) -> None:
    """Write what the warm-up compiled, for the next cold boot (a read-only place only warns)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return
    try:
        cache.write_bytes(artifacts[0])
        log.info("setup: wrote the compile cache %s (%.1f MB)", cache, len(artifacts[0]) / 1e6)
    except OSError as error:
        log.warning("setup: could not write the compile cache %s: %s", cache, error)


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def pipeline_dtype(family: ModelFamily, device: torch.device) -> torch.dtype:
    """float32 on the CPU; on the GPU float16, or bfloat16 for SDXL where the GPU supports it."""
    if device.type != "cuda":
        return torch.float32
    if family is SDXL and bf16_supported(device):
        return torch.bfloat16
    return torch.float16


def optimize_modules(pipeline: DiffusionPipeline) -> list[str]:
    """Fused QKV projections on the UNet and the VAE; returns what was applied.

    Not channels_last: measured on an H100 (torch 2.11, cuDNN 9), it made SDXL's UNet step 45%
    slower (87.8 against 60.7 ms, bfloat16, eager) and its VAE decode 57% slower (142.8 against
    90.7 ms); SD 1.5's VAE decode too (29.0 against 23.8 ms)."""
    applied = []
    for name in ("unet", "vae"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        module.fuse_qkv_projections()
        applied.append(f"{name}: fused QKV")
    return applied


def apply_fast_path(pipeline: DiffusionPipeline, device: torch.device) -> list[str]:
    """Everything above for a pipeline already on `device`; returns what was applied (for the log)."""
    if device.type != "cuda":
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    applied = ["TF32", "SDPA attention", *optimize_modules(pipeline)]
    if getattr(pipeline, "vae", None) is not None:
        pipeline.vae.enable_slicing()  # a batch decodes one image at a time: peak memory / batch
        applied.append("VAE slicing")
    return applied


DECODE_ACTIVATIONS = 8
"""Full-resolution activations a VAE decode holds at once, in its widest output block's channels
(resnet temporaries, normalisation, the upsampler's input): a margin over what one block holds."""


def decode_bytes(vae: torch.nn.Module, width: int, height: int, images: int) -> int:
    """About the most memory an untiled VAE decode of `images` images of width x height takes
    (one at a time when the VAE decodes in slices)."""
    channels = min(vae.config.block_out_channels)  # the full-resolution blocks are the narrowest
    at_once = 1 if getattr(vae, "use_slicing", False) else images
    element = torch.finfo(vae.dtype).bits // 8
    return width * height * channels * element * DECODE_ACTIVATIONS * at_once


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a decode now: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
