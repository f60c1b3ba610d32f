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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline, MultiControlNetModel
from PIL import Image

from sdcog.fetch.adapter_cache import FetchedAdapters
from sdcog.fetch.images import paste_back
from sdcog.generate.batching import BatchFailed, Job
from sdcog.generate.cancellation import CancelFlag, Cancelled, on_generation_thread
from sdcog.generate.controlnets import LoadedControlNet
from sdcog.generate.embeddings import ActiveEmbeddings, AppliedEmbedding, TextualInversions
from sdcog.generate.generation import Generation
from sdcog.generate.loras import LoraAdapters
from sdcog.generate.progress import StepProgress
from sdcog.generate.prompt_encoding import PromptEncoder
from sdcog.generate.refiner import Refiner, load_refiner
from sdcog.generate.safety import SafetyVerdict
from sdcog.generate.second_passes import (
    first_pass_arguments,
    has_second_pass,
    hires_call,
    refiner_call,
    refiner_texts,
    second_pass_steps,
)
from sdcog.model.acceleration import (
    apply_fast_path,
    compile_cache_path,
    compile_mode,
    compile_unet,
    decode_bytes,
    free_memory_bytes,
    pipeline_dtype,
    save_compile_cache,
)
from sdcog.model.checkpoint_loading import ModelHash, find_vae, load_checkpoint, use_vae
from sdcog.model.checkpoints import INPAINTING_CHANNELS, check_configs_fit, folder_few_step
from sdcog.model.families import ModelFamily, detect_family, unet_config
from sdcog.model.weights import WeightsError, WeightsInfo, read_source
from sdcog.model.weights_check import explain_load_error, inspect_weights
from sdcog.resolve.few_step import FewStep
from sdcog.resolve.request import (
    NO_REFINER_LOADED,
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
    pipeline_parameters: dict[tuple[Mode, bool], frozenset[str]]
    """Per mode, plain and steered by ControlNets, the names its pipeline class's constructor takes."""
    few_step: FewStep | None = None
    """The few-step kind of the model (sdcog/resolve/few_step.py), whose defaults requests get."""
    refiner: Refiner | None = None
    """The SDXL refiner around this model's modules (sdcog/generate/refiner.py), when one is loaded."""
    refiner_missing: str | None = NO_REFINER_LOADED
    """Why `refine` is refused; None when the refiner is loaded."""
    model_hash: ModelHash | None = None
    """A single-file checkpoint's short hash, for the metadata's `Model hash`."""

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
                (mode, controlled): frozenset(
                    inspect.signature(pipeline_class(family, mode, controlled).__init__).parameters
                )
                for mode in Mode
                for controlled in (False, True)
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
        directory = weights.directory
        checkpoint = weights.checkpoint
        family = checkpoint.family if checkpoint else detect_family(directory)
        if checkpoint:
            check_configs_fit(checkpoint, detect_family(directory), unet_config(directory))
            log.info("setup: %s is %s", checkpoint.path.name, checkpoint.describe())
        device = device or default_device()
        dtype = pipeline_dtype(family, device)
        files = [checkpoint.path] if checkpoint else list(Path(directory).glob("*/*.safetensors"))
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
            if checkpoint:
                pipeline = load_checkpoint(
                    pipeline_class(family, Mode.TEXT_TO_IMAGE), checkpoint, directory, dtype
                )
            else:
                pipeline = pipeline_class(family, Mode.TEXT_TO_IMAGE).from_pretrained(
                    directory,
                    local_files_only=True,
                    use_safetensors=True,
                    dtype=dtype,
                    variant=weights.variant,
                    # Straight from the files onto the GPU, not through a CPU copy of every weight.
                    device_map=device.type if device.type == "cuda" else None,
                )
            vae = find_vae(directory, checkpoint)
            if vae is not None:
                use_vae(pipeline, vae, directory / "vae")
            pipeline.hf_device_map = None  # one device: nothing to dispatch, so .to() stays allowed
        except WeightsError:
            raise
        except Exception as error:  # a damage the checks cannot see: name the file and the fix
            raise explain_load_error(directory, error) from error
        loaded = time.perf_counter()
        pipeline.to(device)
        fast_path = apply_fast_path(pipeline, device)
        engine = cls.around(pipeline, family, weights, device)
        engine.few_step, why = (checkpoint.few_step, "") if checkpoint else folder_few_step(directory)
        engine.refiner, engine.refiner_missing = load_refiner(pipeline, family, dtype, device)
        if checkpoint:
            engine.model_hash = ModelHash(checkpoint.path, read_source(directory)[0])
        elif engine.few_step:
            log.info("setup: a few-step model, %s (%s)", engine.few_step.label, why)
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
        return ModelLimits(
            family=self.family,
            native_width=width * scale,
            native_height=height * scale,
            few_step=self.few_step,
            inpainting=self.pipeline.unet.config.in_channels == INPAINTING_CHANNELS,
            refiner_missing=self.refiner_missing,
        )

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
        job = Job(request, adapters, cancel or CancelFlag())
        self.generate_batch([job])
        return job.future.result()

    def generate_batch(self, jobs: Sequence[Job]) -> list[Job]:
        """Run jobs of one `batch_key` as one pipeline call; each job's Generation or error is set
        on the job (`Job.finish`). A single job runs exactly as it would alone. Returns the jobs
        whose prompts encode to another shape than the first job's, not run, to be run later.

        A job whose cancel is set leaves at the next step boundary (answered at once; the batch
        stops when none is left). A batch of several that fails (out of memory, or otherwise)
        raises `BatchFailed`, to be split by the caller; a single job gets the error itself.
        """
        head = jobs[0]
        request, adapters = head.request, head.adapters
        shared = head.context.copy()  # what the batch logs as a whole joins the first job's logs
        # 1. A cancel that came while the jobs waited for the generation thread.
        live = _without_canceled(jobs, "before the first denoising step")
        if not live:
            return []
        try:
            # 2. These requests' LoRAs, and no other's.
            applied_loras = shared.run(self.loras.activate, adapters.loras)
            # 3. A pipeline of the requests' mode around the shared modules (with their ControlNets,
            # for this call only); VAE tiling by size.
            pipeline = self._pipeline_for(request, adapters.controlnets)
            self._choose_vae_tiling(request, sum(job.request.num_outputs for job in live))
        except Exception as error:  # the same for every job of the batch
            for job in live:
                job.finish(error)
            return []
        # 4. Each job's prompts, with these requests' embeddings in them, then the call.
        with shared.run(self.embeddings.applied, adapters.embeddings) as active:
            prompts, deferred = self._encode_prompts(live, active)
            live = _without_canceled(
                [job for job in live if job in prompts], "before the first denoising step"
            )
            if not live:
                return deferred
            later = second_pass_steps(request, pipeline.scheduler)
            progress = {job: StepProgress(request.num_inference_steps + later, later=later) for job in live}
            arguments = self._call_arguments(
                live, [prompts[job] for job in live], self._on_step_end(progress)
            )
            arguments.update(self.prompts.call_arguments(request.clip_skip))
            arguments.update(first_pass_arguments(request))
            # 5. Denoise and decode, or hand over to a second pass (hires fix, refiner) that does.
            with self.prompts.skipping_in_call(request.clip_skip):
                output = _run_or_stopped_or_out_of_memory(pipeline, arguments)
                if has_second_pass(request) and not _failed(output):
                    for steps in progress.values():
                        steps.earlier, steps.later = steps.done, 0
                    try:
                        pipeline, call = self._second_call(live, output, arguments, active)
                    except Exception as error:  # answered as the call's own errors are
                        output = error
                    else:
                        output = _run_or_stopped_or_out_of_memory(pipeline, call)
        if output is _STOPPED:
            return deferred
        if output is _OUT_OF_MEMORY:
            del pipeline
            free_accelerator_memory()
            if len(live) > 1:
                raise BatchFailed(f"out of GPU memory for {len(live)} requests together")
            live[0].finish(OutOfMemory(request, self.device))
            return deferred
        if isinstance(output, BaseException):
            if len(live) > 1:
                raise BatchFailed(f"{type(output).__name__}: {output}") from output
            live[0].finish(output)
            return deferred
        # 6. Each job's images, the safety checker's verdicts, inpainting's kept pixels put back.
        per_job = len(output.images) // len(live)
        flags = getattr(output, "nsfw_content_detected", None)
        for index, job in enumerate(live):
            if job.done:  # it left the batch when canceled
                continue
            rows = slice(index * per_job, (index + 1) * per_job)
            generation = Generation(
                images=list(output.images[rows]),
                safety=self._safety_verdicts(None if flags is None else flags[rows], job),
                loras=applied_loras,
                embeddings=prompts[job].embeddings,
                controlnets=list(job.adapters.controlnets),
            )
            if job.request.mode == Mode.INPAINT:
                generation.images = self._paste_back(generation, job.request)
            if job.request.mode != Mode.TEXT_TO_IMAGE:
                job.log(
                    logging.INFO,
                    "%s: prompt_strength %g ran %d of %d denoising steps",
                    job.request.mode,
                    job.request.prompt_strength,
                    progress[job].done,
                    job.request.num_inference_steps,
                    logger=log,
                )
            job.finish(generation)
        return deferred

    def _second_call(
        self, jobs: list[Job], first: Any, arguments: dict[str, Any], active: ActiveEmbeddings
    ) -> tuple[DiffusionPipeline, dict[str, Any]]:
        """The second pass's pipeline and arguments, with each image's seed drawn again."""
        request = jobs[0].request
        generators = seeded_generators([seed for job in jobs for seed in job.request.seeds])
        if request.hires:
            return hires_call(self._pipeline_for, request, first, arguments, generators)
        texts = refiner_texts(jobs, lambda field, text: self.prompts.parse(field, text, active.expand).text)
        return refiner_call(self.refiner.pipeline, request, first, arguments, texts, generators)

    def _encode_prompts(
        self, jobs: list[Job], active: ActiveEmbeddings
    ) -> tuple[dict[Job, Prompts], list[Job]]:
        """Each job's prompt arguments; a job whose prompts are refused gets that error. The jobs
        whose prompts have another shape than the first encoded one's are returned apart."""
        prompts: dict[Job, Prompts] = {}
        deferred: list[Job] = []
        shape = None
        for job in jobs:
            active.used.clear()
            try:
                arguments = job.context.run(
                    self.prompts.arguments,
                    job.request.prompt,
                    job.request.negative_prompt,
                    active.expand,
                    job.request.clip_skip,
                )
            except Exception as error:
                job.finish(error)
                continue
            job.context.run(active.warn_unused)
            encoded = Prompts(arguments, active.applied)
            if shape is None:
                shape = encoded.shape
            if encoded.shape != shape:
                deferred.append(job)
                continue
            prompts[job] = encoded
        return prompts, deferred

    def _pipeline_for(
        self, request: GenerationRequest, controlnets: Sequence[LoadedControlNet] = ()
    ) -> DiffusionPipeline:
        """A pipeline of the request's mode around the shared components, with its own scheduler,
        and the request's ControlNets (one, or diffusers' MultiControlNetModel of several).

        Image-to-image and inpainting reuse the loaded modules: no second copy of any weights.
        """
        loaded = self.pipeline
        controlled = bool(controlnets)
        mode = Mode.INPAINT if request.inpainting_model else request.mode
        parameters = self.pipeline_parameters[(mode, controlled)]
        components = {name: module for name, module in loaded.components.items() if name in parameters}
        if controlled:
            models = [controlnet.model for controlnet in controlnets]
            components["controlnet"] = models[0] if len(models) == 1 else MultiControlNetModel(models)
        components["scheduler"] = build_scheduler(
            request.scheduler,
            loaded.scheduler.config,
            request.num_inference_steps,
            request.timestep_spacing,
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
        if "add_watermarker" in parameters:
            settings["add_watermarker"] = False  # as the plain SDXL pipelines here: no watermark
        per_request = pipeline_class(self.family, mode, controlled)(**components, **settings)
        per_request.set_progress_bar_config(disable=True)
        return per_request

    def _choose_vae_tiling(self, request: GenerationRequest, images: int) -> None:
        """Decode (and encode) in overlapping tiles only when an untiled decode of `images` images
        would take more than half the memory free now; set for every call, so none inherits it.
        Tiles cost time (a 256x256 decode took 5x as long tiled) and leave faint seams, so the
        size alone never decides: a VAE's tile size is its training size, not a memory limit."""
        vae = self.pipeline.vae
        needed = decode_bytes(vae, *request.output_size, images)
        vae.use_tiling = needed > free_memory_bytes(self.device) // 2

    @staticmethod
    def _on_step_end(progress: dict[Job, StepProgress]) -> Callable[..., dict]:
        """The step callback: each job's progress line in its own logs, and each job's cancel
        (the job leaves; the call stops once no job is left)."""

        def on_step_end(running, _step, _timestep, callback_kwargs):
            now = time.monotonic()
            for job, steps in progress.items():
                if job.done:
                    continue
                # The scheduler's own step count (fewer with image-to-image, more with 2nd-order
                # samplers), with the steps of the passes before and after it.
                steps.total = steps.earlier + running.num_timesteps + steps.later
                job.context.run(steps.step)
                job.denoised = now
                if job.cancel.is_set():
                    _leave(job, f"after denoising step {steps.done} of {steps.total}")
            if all(job.done for job in progress):
                raise _Stopped
            return callback_kwargs

        return on_step_end

    @staticmethod
    def _call_arguments(
        jobs: list[Job], prompts: list[Prompts], on_step_end: Callable[..., dict]
    ) -> dict[str, Any]:
        """The pipeline call's arguments for jobs of one batch key. One job gets exactly what it
        would alone; several get their prompts, seeds' generators and input images in job order
        (diffusers orders a batch's images prompt by prompt, `num_images_per_prompt` each)."""
        request = jobs[0].request
        arguments: dict[str, Any] = dict(
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_outputs,
            generator=seeded_generators([seed for job in jobs for seed in job.request.seeds]),
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        if request.mode != Mode.IMAGE_TO_IMAGE or request.inpainting_model:
            arguments.update(width=request.width, height=request.height)

        def per_image(value: Callable[[GenerationRequest], object]) -> object:
            if len(jobs) == 1:
                return value(request)
            return [value(job.request) for job in jobs for _ in range(request.num_outputs)]

        if request.mode != Mode.TEXT_TO_IMAGE:
            arguments.update(image=per_image(lambda each: each.init_image), strength=request.prompt_strength)
        if request.mode == Mode.INPAINT:
            arguments.update(mask_image=per_image(lambda each: each.mask_image))
        elif request.inpainting_model:
            # An inpainting model repaints the whole canvas: text-to-image from pure noise (strength
            # 1), image-to-image from the input image, as AUTOMATIC1111 runs such a model.
            arguments.update(image=per_image(_canvas), mask_image=per_image(_whole_mask))
            if request.mode == Mode.TEXT_TO_IMAGE:
                arguments.update(strength=1.0)
        if request.controlnets:
            arguments.update(_control_arguments(jobs))
        arguments.update(Prompts.joined(prompts))
        return arguments

    @staticmethod
    def _paste_back(generation: Generation, request: GenerationRequest) -> list[Image.Image]:
        """Inpainting: the pixels outside the mask copied from the input (flagged images stay black)."""
        return [
            image if is_flagged else paste_back(image, request.init_image, request.mask_image)
            for image, is_flagged in zip(generation.images, generation.flagged, strict=True)
        ]

    def _safety_verdicts(self, flags: Sequence[bool] | None, job: Job) -> list[SafetyVerdict] | None:
        """The checker's verdict per image (diffusers made flagged ones black), flagged ones logged."""
        request = job.request
        if not self.has_safety_checker:
            return None
        if request.disable_safety_checker or flags is None:
            return [SafetyVerdict.DISABLED] * request.num_outputs
        flags = [bool(flag) for flag in flags]
        for index, flagged in enumerate(flags):
            if flagged:
                job.log(
                    logging.WARNING,
                    "image %d (seed %d) was flagged by the safety checker and replaced by a black image",
                    index,
                    request.seeds[index],
                    logger=log,
                )
        if all(flags):
            job.log(
                logging.WARNING,
                "all %d image(s) were flagged by the safety checker, so every output is black: "
                "try another prompt or seed",
                len(flags),
                logger=log,
            )
        return [SafetyVerdict.FLAGGED if flagged else SafetyVerdict.PASSED for flagged in flags]


@dataclass
class Prompts:
    """A job's prompt arguments for the pipeline (texts, or embeddings) and the embeddings used."""

    arguments: dict[str, Any]
    embeddings: list[AppliedEmbedding]

    @property
    def shape(self) -> tuple:
        """Equal for prompts that can share a call: the same arguments, tensors of the same shape
        but for the batch, and texts with or without a negative prompt alike."""
        return tuple(
            sorted(
                (name, tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else value is None)
                for name, value in self.arguments.items()
            )
        )

    @staticmethod
    def joined(prompts: list[Prompts]) -> dict[str, Any]:
        """One call's prompt arguments: one job's as they are; several jobs' as lists or tensors
        joined along the batch."""
        if len(prompts) == 1:
            return dict(prompts[0].arguments)
        joined: dict[str, Any] = {}
        for name, first in prompts[0].arguments.items():
            values = [prompt.arguments[name] for prompt in prompts]
            if isinstance(first, torch.Tensor):
                joined[name] = torch.cat(values)
            else:
                joined[name] = None if first is None else values
        return joined


def pipeline_class(family: ModelFamily, mode: Mode, controlled: bool = False) -> type[DiffusionPipeline]:
    """The diffusers pipeline class that runs `mode` for `family` (steered by ControlNets or not)."""
    modes = (Mode.TEXT_TO_IMAGE, Mode.IMAGE_TO_IMAGE, Mode.INPAINT)
    if controlled:
        return getattr(diffusers, family.controlnet_pipeline_classes[modes.index(mode)])
    name = {
        Mode.TEXT_TO_IMAGE: family.pipeline_class,
        Mode.IMAGE_TO_IMAGE: family.img2img_pipeline_class,
        Mode.INPAINT: family.inpaint_pipeline_class,
    }[mode]
    return getattr(diffusers, name)


def _canvas(request: GenerationRequest) -> Image.Image:
    """The image an inpainting model starts from: the input image, or (text-to-image) a grey one,
    which the whole-canvas mask hides from it."""
    return request.init_image or Image.new("RGB", (request.width, request.height), (127, 127, 127))


def _whole_mask(request: GenerationRequest) -> Image.Image:
    return Image.new("L", (request.width, request.height), 255)


def _control_arguments(jobs: list[Job]) -> dict[str, Any]:
    """The ControlNet arguments of a call: each ControlNet's map (one job's, or one per job: diffusers
    repeats a prompt's map for its `num_images_per_prompt` images), scale and start/end fractions.
    The text-to-image pipelines take the maps as `image`; the others as `control_image`."""
    request = jobs[0].request
    maps = [
        control.control_map if len(jobs) == 1 else [job.request.controlnets[slot].control_map for job in jobs]
        for slot, control in enumerate(request.controlnets)
    ]
    single = len(maps) == 1
    name = "image" if request.mode == Mode.TEXT_TO_IMAGE else "control_image"

    def each(values: list) -> object:
        return values[0] if single else values

    return {
        name: each(maps),
        "controlnet_conditioning_scale": each(
            [control.conditioning_scale for control in request.controlnets]
        ),
        "control_guidance_start": each([control.start for control in request.controlnets]),
        "control_guidance_end": each([control.end for control in request.controlnets]),
    }


class _Stopped(Exception):
    """Raised from the step callback once every job of the call has left it."""


_STOPPED = object()
_OUT_OF_MEMORY = object()


def _failed(output: Any) -> bool:
    return output is _STOPPED or output is _OUT_OF_MEMORY or isinstance(output, BaseException)


def _leave(job: Job, where: str) -> None:
    """The job is canceled: answered now, with the line its logs show."""
    error = Cancelled(f"canceled {where}")
    job.log(logging.INFO, "%s", error, logger=log)
    job.finish(error)


def _without_canceled(jobs: Sequence[Job], where: str) -> list[Job]:
    live = []
    for job in jobs:
        if job.cancel.is_set():
            _leave(job, where)
        elif not job.done:
            live.append(job)
    return live


def _run_or_stopped_or_out_of_memory(pipeline: DiffusionPipeline, arguments: dict[str, Any]) -> Any:
    """The pipeline's output; `_STOPPED` when every job left; `_OUT_OF_MEMORY` when the GPU ran out
    of memory (the failed run's frames are released when this returns, so the caller can free
    their memory); another error, returned."""
    try:
        return pipeline(**arguments)
    except _Stopped:
        return _STOPPED
    except torch.OutOfMemoryError:
        return _OUT_OF_MEMORY
    except Exception as error:
        return error


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
