"""The fast path on a GPU: precision per family, memory layout, fused attention projections, TF32.

Applied once at load, never per request:
- half precision: float16 for SD 1.x/2.x; bfloat16 for SDXL where the GPU has it, because
  SDXL's VAE overflows in float16 (diffusers then decodes in float32: `force_upcast`), while
  bfloat16 has float32's range, so the VAE decodes in half precision too (diffusers upcasts
  only a float16 VAE). Without bfloat16
  (pre-Ampere GPUs) SDXL runs in float16 with the upcast VAE;
- PyTorch's scaled-dot-product attention (diffusers' default processor with torch 2);
- channels_last memory layout for the UNet and the VAE (faster convolutions on tensor cores);
- fused QKV projections (one matmul instead of three in every self-attention);
- TF32 matmuls and convolutions for whatever still runs in float32;
- VAE slicing: a batch decodes one image at a time (the engine also tiles very large sizes).
On the CPU the model runs in float32 with none of this (`fast_path_settings` is empty), so the
project works anywhere. The numerics of the layout and fusion changes are checked on the CPU
(tests/test_acceleration.py); their speed only shows on a GPU (`script/bench --device cuda`).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from sdcog.families import SDXL, ModelFamily


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
    """channels_last and fused QKV projections on the UNet and the VAE; returns what was applied."""
    applied = []
    for name in ("unet", "vae"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        module.to(memory_format=torch.channels_last)
        module.fuse_qkv_projections()
        applied.append(f"{name}: channels_last, fused QKV")
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
