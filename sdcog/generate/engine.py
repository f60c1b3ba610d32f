"""The loaded model: one diffusers pipeline, loaded once, run per request.

Per request the engine builds a lightweight pipeline object of the request's mode (text-to-image,
image-to-image, inpainting) around the shared, already loaded components (UNet, VAE, text
encoders, tokenizers) with a fresh scheduler, so no request changes state another one sees, and
no weights are copied.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from PIL import Image

from sdcog.fetch.adapter_cache import FetchedAdapters
from sdcog.fetch.images import paste_back
from sdcog.generate.cancellation import CancelFlag, on_generation_thread
from sdcog.generate.embeddings import TextualInversions
from sdcog.generate.generation import Generation
from sdcog.generate.loras import LoraAdapters
from sdcog.generate.progress import StepProgress
from sdcog.generate.prompt_encoding import PromptEncoder
from sdcog.generate.safety import SafetyVerdict
from sdcog.model.acceleration import (
    apply_fast_path,
    compile_cache_path,
    compile_mode,
    compile_unet,
    pipeline_dtype,
    save_compile_cache,
)
from sdcog.model.families import ModelFamily, detect_family
from sdcog.model.weights import WeightsInfo
from sdcog.model.weights_check import explain_load_error, inspect_weights
from sdcog.resolve.request import (
    GenerationRequest,
    Mode,
    ModelLimits,
    resolve_request,
)
from sdcog.resolve.schedulers import build_scheduler

log = logging.getLogger(__name__)


NO_ADAPTERS = FetchedAdapters()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@dataclass
class Engine:
    """The loaded pipeline and the components built around it once, at load (see `around`)."""

    pipeline: DiffusionPipeline
    family: ModelFamily
    weights: WeightsInfo
    device: torch.device
    embeddings: TextualInversions
    prompts: PromptEncoder
    loras: LoraAdapters
    pipeline_parameters: dict[Mode, frozenset[str]]
    """Per mode, the names its pipeline class's constructor takes."""

    @classmethod
    def around(
        cls, pipeline: DiffusionPipeline, family: ModelFamily, weights: WeightsInfo, device: torch.device
    ) -> Engine:
        """The engine's components, in the order they depend on each other: the embedding slots
        join the tokenizers first, so the prompt encoder and every request see the same tokenizers;
        the LoRA adapters last, once the fast path has set the attention processors."""
        embeddings = TextualInversions(pipeline)
        return cls(
            pipeline=pipeline,
            family=family,
            weights=weights,
            device=device,
            embeddings=embeddings,
            prompts=PromptEncoder(pipeline),
            loras=LoraAdapters(pipeline),
            pipeline_parameters={
                mode: frozenset(inspect.signature(pipeline_class(family, mode).__init__).parameters)
                for mode in Mode
            },
        )

    @classmethod
    def load(cls, directory: Path, device: torch.device | None = None) -> Engine:
        """Load the pipeline in `directory` offline, onto `device` (the GPU when there is one)."""
        started = time.perf_counter()
        # Per-component progress bars only clutter the setup logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        weights = inspect_weights(directory)
        family = detect_family(directory)
        device = device or default_device()
        dtype = pipeline_dtype(family, device)
        files = list(Path(directory).glob("*/*.safetensors"))
        log.info(
            "setup: loading %s (%s) from %s: %d safetensors files, %.1f MB%s, onto %s as %s",
            weights.name,
            family.label,
            directory,
            len(files),
            sum(path.stat().st_size for path in files) / 1e6,
            f" ({weights.variant} variant)" if weights.variant else "",
            device,
            str(dtype).removeprefix("torch."),
        )
        try:
            pipeline = pipeline_class(family, Mode.TEXT_TO_IMAGE).from_pretrained(
                directory,
                local_files_only=True,
                use_safetensors=True,
                dtype=dtype,
                variant=weights.variant,
                # Straight from the files onto the GPU, not through a CPU copy of every weight.
                device_map=device.type if device.type == "cuda" else None,
            )
            pipeline.hf_device_map = None  # one device: nothing to dispatch, so .to() stays allowed
        except Exception as error:  # a damage the checks cannot see: name the file and the fix
            raise explain_load_error(directory, error) from error
        loaded = time.perf_counter()
        pipeline.to(device)
        fast_path = apply_fast_path(pipeline, device)
        engine = cls.around(pipeline, family, weights, device)
        limits = engine.limits
        log.info(
            "setup: loaded %s in %.1f s (reading %.1f s, moving to %s %.1f s); components: %s; "
            "native size %dx%d; safety checker: %s; fast path: %s",
            weights.name,
            time.perf_counter() - started,
            loaded - started,
            device,
            time.perf_counter() - loaded,
            ", ".join(name for name, module in pipeline.components.items() if module is not None),
            limits.native_width,
            limits.native_height,
            "on by default" if engine.has_safety_checker else "none in this model",
            "; ".join(fast_path) or "none (CPU: float32)",
        )
        mode = compile_mode()
        if mode is not None:
            engine._compile_and_warm_up(compile_cache_path(directory), mode)
        return engine

    def _compile_and_warm_up(self, cache: Path, mode: str) -> None:
        """torch.compile the UNet and run it at the native size, so requests do not compile; on the
        generation thread, where requests run (CUDA graphs belong to the thread that records them)."""
        started = time.perf_counter()
        cached = compile_unet(self.pipeline, cache, mode)
        limits = self.limits
        warm_up = resolve_request(
            limits,
            prompt="warm-up",
            width=limits.native_width,
            height=limits.native_height,
            num_inference_steps=3,  # CUDA graphs: a warm-up call, a recording, a replay
            seed=0,
        )
        on_generation_thread(lambda: self.generate(warm_up))
        if not cached:
            save_compile_cache(cache)
        log.info(
            "setup: compiled the UNet (%s) and warmed it up at %dx%d in %.1f s (compile cache %s)",
            mode,
            limits.native_width,
            limits.native_height,
            time.perf_counter() - started,
            f"loaded from {cache}" if cached else "built",
        )

    @property
    def limits(self) -> ModelLimits:
        sample_size = self.pipeline.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        scale = self.pipeline.vae_scale_factor
        return ModelLimits(family=self.family, native_width=width * scale, native_height=height * scale)

    @property
    def has_safety_checker(self) -> bool:
        return getattr(self.pipeline, "safety_checker", None) is not None

    def generate(
        self,
        request: GenerationRequest,
        cancel: CancelFlag | None = None,
        adapters: FetchedAdapters = NO_ADAPTERS,
    ) -> Generation:
        """Run one request: text-to-image, image-to-image or inpainting, by `request.mode`, with
        exactly `adapters.loras` applied (none: the base model) and `adapters.embeddings` for this
        request only.

        Progress is logged per step (throttled); `cancel`, when set, stops the run after the
        current step with `Cancelled` (the VAE decode is skipped). Running out of GPU memory frees
        the cache and raises `OutOfMemory`, which suggests a smaller request.
        """
        # 1. A cancel that came while this request waited for the generation thread.
        _check_cancel(cancel, "before the first denoising step")
        # 2. This request's LoRAs, and no other's.
        applied_loras = self.loras.activate(adapters.loras)
        # 3. A pipeline of the request's mode around the shared modules; VAE tiling by its size.
        pipeline = self._pipeline_for(request)
        self._choose_vae_tiling(request)
        # 4. The pipeline's arguments: sizes, images, seeds, and the step callback.
        progress = StepProgress(total=request.num_inference_steps)
        arguments = self._call_arguments(request, self._on_step_end(progress, cancel))
        # 5. Denoise and decode with this request's embeddings in the prompts.
        with self.embeddings.applied(adapters.embeddings) as active:
            arguments.update(self.prompts.arguments(request.prompt, request.negative_prompt, active.expand))
            active.warn_unused()
            _check_cancel(cancel, "before the first denoising step")  # came while the prompts were read
            output = _run_or_none_if_out_of_memory(pipeline, arguments)
        if output is None:
            del pipeline
            free_accelerator_memory()
            raise OutOfMemory(request, self.device)
        # 6. The safety checker's verdicts, and inpainting's untouched pixels put back.
        generation = Generation(
            images=list(output.images),
            safety=self._safety_verdicts(output, request),
            loras=applied_loras,
            embeddings=active.applied,
        )
        if request.mode == Mode.INPAINT:
            generation.images = self._paste_back(generation, request)
        if request.mode != Mode.TEXT_TO_IMAGE:
            log.info(
                "%s: prompt_strength %g ran %d of %d denoising steps",
                request.mode,
                request.prompt_strength,
                progress.done,
                request.num_inference_steps,
            )
        return generation

    def _pipeline_for(self, request: GenerationRequest) -> DiffusionPipeline:
        """A pipeline of the request's mode around the shared components, with its own scheduler.

        Image-to-image and inpainting reuse the loaded modules: no second copy of any weights.
        """
        loaded = self.pipeline
        parameters = self.pipeline_parameters[request.mode]
        components = {name: module for name, module in loaded.components.items() if name in parameters}
        components["scheduler"] = build_scheduler(
            request.scheduler, loaded.scheduler.config, request.num_inference_steps
        )
        # Constructor settings that are config values, not modules (requires_safety_checker,
        # force_zeros_for_empty_prompt, ...), carried over from the loaded pipeline.
        settings = {
            name: loaded.config[name]
            for name in parameters
            if name not in components and name in loaded.config
        }
        if request.disable_safety_checker and components.get("safety_checker") is not None:
            components["safety_checker"] = None
            settings["requires_safety_checker"] = False
        per_request = pipeline_class(self.family, request.mode)(**components, **settings)
        per_request.set_progress_bar_config(disable=True)
        return per_request

    def _choose_vae_tiling(self, request: GenerationRequest) -> None:
        """Decode (and encode) in overlapping tiles when a side is over twice the VAE's tile size.

        A 2048x2048 SD 1.x decode holds a 65,536-token attention in the VAE's middle block; tiles
        of the VAE's own size keep that bounded. Set for every request, so none inherits it.
        """
        vae = self.pipeline.vae
        vae.use_tiling = max(request.width, request.height) > 2 * vae.tile_sample_min_size

    @staticmethod
    def _on_step_end(progress: StepProgress, cancel: CancelFlag | None) -> Callable[..., dict]:
        def on_step_end(running, _step, _timestep, callback_kwargs):
            # The scheduler's own step count: fewer with image-to-image, more with 2nd-order samplers.
            progress.total = running.num_timesteps
            progress.step()
            _check_cancel(cancel, f"after denoising step {progress.done} of {progress.total}")
            return callback_kwargs

        return on_step_end

    @staticmethod
    def _call_arguments(request: GenerationRequest, on_step_end: Callable[..., dict]) -> dict[str, Any]:
        """The pipeline call's arguments for the request's mode, prompts aside."""
        arguments: dict[str, Any] = dict(
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_outputs,
            generator=seeded_generators(request.seeds),
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        if request.mode != Mode.IMAGE_TO_IMAGE:
            arguments.update(width=request.width, height=request.height)
        if request.mode != Mode.TEXT_TO_IMAGE:
            arguments.update(image=request.init_image, strength=request.prompt_strength)
        if request.mode == Mode.INPAINT:
            arguments.update(mask_image=request.mask_image)
        return arguments

    @staticmethod
    def _paste_back(generation: Generation, request: GenerationRequest) -> list[Image.Image]:
        """Inpainting: the pixels outside the mask copied from the input (flagged images stay black)."""
        return [
            image if is_flagged else paste_back(image, request.init_image, request.mask_image)
            for image, is_flagged in zip(generation.images, generation.flagged, strict=True)
        ]

    def _safety_verdicts(self, output: object, request: GenerationRequest) -> list[SafetyVerdict] | None:
        """The checker's verdict per image (diffusers made flagged ones black), flagged ones logged."""
        if not self.has_safety_checker:
            return None
        if request.disable_safety_checker:
            return [SafetyVerdict.DISABLED] * request.num_outputs
        flags = [bool(flag) for flag in output.nsfw_content_detected]
        for index, flagged in enumerate(flags):
            if flagged:
                log.warning(
                    "image %d (seed %d) was flagged by the safety checker and replaced by a black image",
                    index,
                    request.seeds[index],
                )
        if all(flags):
            log.warning(
                "all %d image(s) were flagged by the safety checker, so every output is black: "
                "try another prompt or seed",
                len(flags),
            )
        return [SafetyVerdict.FLAGGED if flagged else SafetyVerdict.PASSED for flagged in flags]


def pipeline_class(family: ModelFamily, mode: Mode) -> type[DiffusionPipeline]:
    """The diffusers pipeline class that runs `mode` for `family`."""
    name = {
        Mode.TEXT_TO_IMAGE: family.pipeline_class,
        Mode.IMAGE_TO_IMAGE: family.img2img_pipeline_class,
        Mode.INPAINT: family.inpaint_pipeline_class,
    }[mode]
    return getattr(diffusers, name)


def _check_cancel(cancel: CancelFlag | None, when: str) -> None:
    if cancel is not None:
        cancel.check(when)


def _run_or_none_if_out_of_memory(pipeline: DiffusionPipeline, arguments: dict[str, Any]) -> Any:
    """The pipeline's output; None when the GPU ran out of memory (the failed run's frames are
    released when this returns, so the caller can free their memory)."""
    try:
        return pipeline(**arguments)
    except torch.OutOfMemoryError:
        return None


def free_accelerator_memory() -> None:
    """Release what a failed run left behind: Python garbage, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory for a request; the message says what to ask for instead."""

    def __init__(self, request: GenerationRequest, device: torch.device):
        total = ""
        if device.type == "cuda":
            total = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB GPU)"
        super().__init__(
            f"out of GPU memory{total} generating {request.num_outputs} image(s) of "
            f"{request.width}x{request.height} with {request.num_inference_steps} steps: ask for a "
            "smaller width and height, or fewer num_outputs. The memory has been freed; the next "
            "prediction runs normally."
        )
