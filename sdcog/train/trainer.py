"""One training, as `cog train` runs it: the model loaded, the archive read, the LoRA trained with
progress lines, and `trained_model.tar` written (whole, or not at all).

The model is the one predictions use (MODEL_WEIGHTS, weights/ or the bundled model), loaded
without the inference fast path (fused attention projections would hide the layers the LoRA
trains). On a GPU the frozen weights are in half precision (bfloat16 for SDXL where supported),
the adapters and the trigger word's vectors in float32, with gradient checkpointing on the UNet
(see `lora_training._optimizer` on 8-bit Adam); on the CPU everything is float32.

Trainings run one at a time on the generation thread (`train_in_background`, what the async
`train()` awaits: Cog's concurrency setting, which the predictions need, requires an async
function): a second training waits for the first. A cancel sets the training's flag, which the
loop reads after every step: it stops there, and no tar is written.

Progress lines have the layout Replicate's clients parse (see `sdcog.generate.progress`), with the
loss after them: ` 40%|████      | 400/1000 [01:10<01:45, 5.70it/s] loss 0.0831`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from sdcog.errors import InputError
from sdcog.fetch.input_files import decode_data_uri, fetch_url_to
from sdcog.generate.cancellation import CancelFlag, Cancelled, generation_thread
from sdcog.generate.engine import default_device, pipeline_class
from sdcog.generate.progress import StepProgress
from sdcog.model.acceleration import pipeline_dtype
from sdcog.model.families import detect_family
from sdcog.model.weights_check import inspect_weights
from sdcog.resolve.request import EMBEDDING_TOKEN, Mode
from sdcog.train.dataset import FIELD, MAX_TOTAL_BYTES, read_training_set
from sdcog.train.lora_training import LoraSettings, train_lora
from sdcog.train.output import write_trained_model

log = logging.getLogger(__name__)

PIVOTAL_TOKENS = 2
"""New tokens the trigger word stands for with pivotal tuning (Replicate's SDXL trainer: 2)."""
MAX_SDXL_RESOLUTION_DEFAULT = 768
"""SDXL trains at 768 px by default, as Replicate's trainer does (1024 takes about twice as long)."""
OUTPUT_NAME = "trained_model.tar"
MAX_ARCHIVE_BYTES = MAX_TOTAL_BYTES
"""The largest `input_images` download: what its files may unpack to together."""


@dataclass(frozen=True)
class TrainingInputs:
    """`train.py`'s inputs, checked (see `check`)."""

    trigger_word: str = "TOK"
    caption_prefix: str = "a photo of "
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    ti_learning_rate: float = 3e-4
    lora_rank: int = 32
    resolution: int | None = None
    train_batch_size: int = 4
    seed: int | None = None
    pivotal_tuning: bool = True

    def check(self) -> TrainingInputs:
        if not EMBEDDING_TOKEN.fullmatch(self.trigger_word) or not self.trigger_word.strip():
            raise InputError(
                "trigger_word",
                f"{self.trigger_word!r} cannot be written in a prompt as one word: use letters and "
                "digits, without spaces, commas or brackets",
            )
        if self.resolution is not None and self.resolution % 8:
            raise InputError("resolution", f"must be a multiple of 8, got {self.resolution}")
        for name in ("learning_rate", "ti_learning_rate"):
            if not getattr(self, name) > 0:
                raise InputError(name, f"must be above 0, got {getattr(self, name)}")
        return self


def load_for_training(directory: Path, device: torch.device) -> tuple[DiffusionPipeline, str]:
    """The pipeline in `directory`, offline, on `device`, in the dtype predictions use; and its
    name and family, for the model card."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    weights = inspect_weights(directory)
    family = detect_family(directory)
    dtype = pipeline_dtype(family, device)
    pipeline = pipeline_class(family, Mode.TEXT_TO_IMAGE).from_pretrained(
        directory, local_files_only=True, use_safetensors=True, dtype=dtype, variant=weights.variant
    )
    prepare_for_training(pipeline, device)
    log.info(
        "train: %s (%s) on %s as %s", weights.name, family.label, device, str(dtype).removeprefix("torch.")
    )
    return pipeline, f"{weights.name} ({family.label})"


def prepare_for_training(pipeline: DiffusionPipeline, device: torch.device) -> None:
    """On `device`, without progress bars, and on a GPU with gradient checkpointing on the UNet
    (its activations are recomputed in the backward pass instead of kept: slower per step, and
    what lets SDXL at batch 4 and 768 px train within 24 GB)."""
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipeline.unet.enable_gradient_checkpointing()


def native_resolution(pipeline: DiffusionPipeline) -> int:
    sample_size = pipeline.unet.config.sample_size
    side = sample_size if isinstance(sample_size, int) else min(sample_size)
    native = side * pipeline.vae_scale_factor
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL
        return min(native, MAX_SDXL_RESOLUTION_DEFAULT)
    return native


def fetch_archive(value: object, directory: Path) -> Path:
    """`input_images` as a file: a local path as it is; a URL (streamed to disk under the archive
    limit and the input timeouts) or a data URI, as Cog hands them over undownloaded."""
    source = getattr(value, "source", value)
    if isinstance(source, Path) or not isinstance(source, str):
        return Path(source)
    target = directory / "input_images"
    scheme = source.partition(":")[0].lower()
    if scheme == "data":
        target.write_bytes(decode_data_uri(FIELD, source, MAX_ARCHIVE_BYTES, setting="the archive limit"))
    elif scheme in ("http", "https"):
        with target.open("wb") as sink:
            fetch_url_to(sink, FIELD, source, MAX_ARCHIVE_BYTES, setting="the archive limit")
    else:
        return Path(source)
    return target


def run_training(
    archive: object,
    inputs: TrainingInputs,
    weights_dir: Path,
    device: torch.device | None = None,
    output_dir: Path | None = None,
    cancel: CancelFlag | None = None,
) -> Path:
    """Train on `archive` (a path, or a URL or data URI: see `fetch_archive`) and return the path
    of `trained_model.tar` (in `output_dir`, default a new temporary directory)."""
    created = output_dir is None
    output_dir = output_dir or Path(tempfile.mkdtemp(prefix="training-"))
    try:
        return _train(archive, inputs, weights_dir, device, output_dir, cancel)
    except BaseException:  # a failed or canceled training leaves nothing behind
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _train(
    archive: object,
    inputs: TrainingInputs,
    weights_dir: Path,
    device: torch.device | None,
    output_dir: Path,
    cancel: CancelFlag | None,
) -> Path:
    inputs.check()
    cancel = cancel or CancelFlag()
    if cancel.is_set():
        raise Cancelled("canceled before the training started")
    device = device or default_device()
    with tempfile.TemporaryDirectory(prefix="input-", dir=output_dir) as incoming:
        archive = fetch_archive(archive, Path(incoming))
        pipeline, model = load_for_training(weights_dir, device)
        resolution = inputs.resolution or native_resolution(pipeline)
        images = read_training_set(archive, resolution, inputs.trigger_word, inputs.caption_prefix)
    seed = inputs.seed if inputs.seed is not None else random.SystemRandom().randrange(2**32)
    settings = LoraSettings(
        max_train_steps=inputs.max_train_steps,
        learning_rate=inputs.learning_rate,
        lora_rank=inputs.lora_rank,
        train_batch_size=inputs.train_batch_size,
        seed=seed,
        pivotal_tokens=PIVOTAL_TOKENS if inputs.pivotal_tuning else 0,
        ti_learning_rate=inputs.ti_learning_rate,
        trigger_word=inputs.trigger_word,
    )
    log.info(
        "train: %d images at %d px, %d steps of batch %d, LoRA rank %d at learning rate %g%s, seed %d",
        len(images),
        resolution,
        settings.max_train_steps,
        settings.train_batch_size,
        settings.lora_rank,
        settings.learning_rate,
        f", {inputs.trigger_word}'s {PIVOTAL_TOKENS} token embeddings at {inputs.ti_learning_rate:g}"
        if settings.pivotal_tokens
        else "",
        seed,
    )
    progress = StepProgress(total=settings.max_train_steps, interval=2.0)

    def on_step(step: int, loss: float) -> None:
        progress.step(f" loss {loss:.4f}")
        if cancel.is_set():
            log.info("train: canceled after step %d of %d", step, settings.max_train_steps)
            raise Cancelled(f"canceled after step {step}")

    trained = train_lora(pipeline, images, settings, on_step=on_step)
    if torch.cuda.is_available() and device.type == "cuda":
        log.info("train: peak GPU memory %.1f GB", torch.cuda.max_memory_allocated(device) / 1e9)
    recorded = {
        "model": model,
        **asdict(inputs),
        "seed": seed,
        "resolution": resolution,
        "images": len(images),
    }
    started = time.perf_counter()
    path = write_trained_model(output_dir / OUTPUT_NAME, trained, recorded, inputs.trigger_word)
    log.info(
        "train: wrote %s (%.1f MB) in %.1f s",
        path.name,
        path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return path


async def train_in_background(archive: object, inputs: TrainingInputs, weights_dir: Path) -> Path:
    """`run_training` on the generation thread, in this task's context (Cog routes log lines by
    it); if the awaiting task is cancelled (Cog's cancel), the training stops after its step."""
    cancel = CancelFlag()
    context = contextvars.copy_context()
    job = generation_thread().submit(
        context.run, run_training, archive, inputs, weights_dir, None, None, cancel
    )
    try:
        return await asyncio.shield(asyncio.wrap_future(job))
    except asyncio.CancelledError:
        cancel.set()
        raise
