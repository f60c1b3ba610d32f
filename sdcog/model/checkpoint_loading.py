"""Loading a single-file checkpoint, and a separate VAE, offline.

diffusers' `from_single_file` reads the checkpoint's tensors and converts their names, with every
component's config taken from the diffusers-layout folder beside the file (`config=`), so nothing
is looked up on a hub (`local_files_only`). The prediction type decided by `inspect_checkpoint`
is written into the scheduler config, so every per-request scheduler inherits it.

A separate VAE (AUTOMATIC1111's "SD VAE": e.g. the fp16-fix SDXL VAE, or vae-ft-mse for SD 1.5)
replaces the model's own for any weights, folder or file: `VAE_WEIGHTS` names it (a .safetensors
file in the original or diffusers layout, or a diffusers VAE folder), else a `*.vae.safetensors`
beside a checkpoint is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from sdcog.model.checkpoints import VAE_SUFFIX, CheckpointInfo
from sdcog.model.safetensors_files import NotSafetensors, read_header, sha256_of
from sdcog.model.weights import WeightsError

log = logging.getLogger(__name__)

VAE_ENV = "VAE_WEIGHTS"
_LDM_VAE_KEY = "encoder.down.0.block.0.conv1.weight"


def load_checkpoint(
    pipeline_class: type[DiffusionPipeline], info: CheckpointInfo, directory: Path, dtype: torch.dtype
) -> DiffusionPipeline:
    """The pipeline of `info`'s file, with the configs and tokenizers in `directory`."""
    safety = {}
    if not (directory / "safety_checker" / "model.safetensors").is_file():
        safety = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline = pipeline_class.from_single_file(
        str(info.path), config=str(directory), local_files_only=True, torch_dtype=dtype, **safety
    )
    scheduler = pipeline.scheduler
    if scheduler.config.get("prediction_type") != info.prediction_type:
        pipeline.scheduler = type(scheduler).from_config(
            scheduler.config, prediction_type=info.prediction_type
        )
    return pipeline


class ModelHash:
    """AUTOMATIC1111's `Model hash` of a checkpoint: the first 10 hex digits of the file's sha256
    (what Civitai matches a model by). The sha256 `script/download-weights` recorded is used when
    the file still has the size it recorded; else the file is hashed on a thread of its own, so
    setup does not wait for it (a 7 GB file takes seconds); the first image's metadata may."""

    def __init__(self, path: Path, source: Mapping[str, object]):
        recorded = source.get("sha256")
        if isinstance(recorded, str) and source.get("size") == path.stat().st_size:
            self._digest: Future[str] = Future()
            self._digest.set_result(recorded)
        else:
            pool = ThreadPoolExecutor(1, thread_name_prefix="model-hash")
            self._digest = pool.submit(sha256_of, path)
            pool.shutdown(wait=False)  # the thread ends when the hash is done

    @property
    def short(self) -> str:
        return self._digest.result()[:10]


def find_vae(
    directory: Path, checkpoint: CheckpointInfo | None, environ: Mapping[str, str] = os.environ
) -> Path | None:
    """The separate VAE to use: VAE_WEIGHTS, else a `*.vae.safetensors` beside a checkpoint."""
    configured = environ.get(VAE_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if not path.exists():
            raise WeightsError(f"{VAE_ENV}={configured} does not exist")
        return path
    if checkpoint is None:
        return None
    beside = sorted(directory.glob(f"*{VAE_SUFFIX}"))
    own = [path for path in beside if path.name == checkpoint.path.stem + VAE_SUFFIX]
    return (own or beside or [None])[0]


def load_vae(path: Path, config_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE from a diffusers folder, or a file in either layout, shaped by the model's VAE config
    (`config_dir`); a VAE of another shape is refused naming it."""
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(
                path, local_files_only=True, use_safetensors=True, torch_dtype=dtype
            )
        try:
            _, header = read_header(path)
        except NotSafetensors as error:
            raise WeightsError(f"{path} (the VAE) is not a whole safetensors file: {error}") from error
        if any(name.endswith(_LDM_VAE_KEY) for name in header):
            return AutoencoderKL.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype
            )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(path)), strict=True)
        return vae.to(dtype)
    except WeightsError:
        raise
    except Exception as error:  # a VAE for another family, or not a VAE
        raise WeightsError(
            f"{path} does not fit this model's VAE ({config_dir / 'config.json'}): "
            f"{type(error).__name__}: {str(error)[:300]}. A VAE must be of the model's family "
            "(e.g. an SDXL VAE for SDXL models)."
        ) from error


def use_vae(pipeline: DiffusionPipeline, path: Path, config_dir: Path) -> None:
    pipeline.register_modules(vae=load_vae(path, config_dir, pipeline.vae.dtype))
    log.info(
        "setup: the VAE is %s (%s)",
        path,
        f"{VAE_ENV}" if os.environ.get(VAE_ENV) else "beside the checkpoint",
    )
