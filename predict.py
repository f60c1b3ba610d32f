"""The Cog surface: typed inputs -> one request -> the engine -> image files.

No diffusion logic lives here; see the `sdcog` package. The `Input` declarations use literal
values because `cog build` reads them statically; `tests/test_schema.py` checks that they match
the rules `sdcog.resolve.request` enforces.
"""

import asyncio
import dataclasses
import logging
import sys
import time

from cog import BasePredictor, Input, Path, Secret

from sdcog import liveness
from sdcog.fetch.adapter_cache import AdapterCache, FetchedAdapters, adapter_tokens
from sdcog.fetch.control_maps import ControlMaps
from sdcog.fetch.images import Outpaint, open_image
from sdcog.fetch.input_files import guard_cog_downloads, read_input_file
from sdcog.generate.batching import Batcher, until_done
from sdcog.generate.cancellation import on_generation_thread
from sdcog.generate.controlnets import ControlNets
from sdcog.generate.engine import Engine
from sdcog.heap import HeapTrimmer
from sdcog.model.weights import resolve_weights_dir
from sdcog.pinned_internals import log_unchecked_internals
from sdcog.resolve.control import ControlSlot
from sdcog.resolve.request import resolve_request
from sdcog.write.outputs import OutputDirectory, write_outputs

log = logging.getLogger("sdcog")


class Predictor(BasePredictor):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        log_unchecked_internals()
        guard_cog_downloads()
        # Loaded on the generation thread, where every prediction runs: on the CPU, torch's OpenMP
        # runs fast only for the first thread that uses it (measured on 2 cores: 0.57 s against
        # 1.4 s per 20-step image when another thread had loaded the model).
        weights = resolve_weights_dir()
        self.engine = on_generation_thread(lambda: Engine.load(weights))
        self.batcher = Batcher.from_environment(self.engine)
        self.outputs = OutputDirectory()
        self.heap = HeapTrimmer()
        self.adapters = AdapterCache.from_environment()
        self.controlnets = ControlNets.from_environment(self.engine)
        self.control_maps = ControlMaps(device=str(self.engine.device))

    async def predict(
        self,
        prompt: str = Input(
            description="What the image should show.",
            default="a photo of an astronaut riding a horse on mars",
        ),
        negative_prompt: str | None = Input(description="What the image should not show.", default=None),
        image: Path | None = Input(
            description="Input image (URL or data URI) for image-to-image: the output follows its layout. With mask or outpaint_*, inpainting. Its size, rounded to multiples of 8, is the output size unless width/height are given (then it is resized to them).",  # noqa: E501
            default=None,
        ),
        mask: Path | None = Input(
            description="Inpainting mask for image: white areas are repainted, black areas are kept exactly (pixels outside the mask are copied from image). Resized to the image's size if it differs.",  # noqa: E501
            default=None,
        ),
        width: int | None = Input(
            description="Width in pixels, a multiple of 8. Default: the model's native size (512 for SD 1.x, 512 or 768 for SD 2.x, 1024 for SDXL). width x height x num_outputs must fit the model family's pixel budget.",  # noqa: E501
            default=None,
            ge=64,
            le=2048,
        ),
        height: int | None = Input(
            description="Height in pixels, a multiple of 8. Default: the model's native size.",
            default=None,
            ge=64,
            le=2048,
        ),
        num_outputs: int = Input(description="Number of images to generate.", default=1, ge=1, le=4),
        num_inference_steps: int | None = Input(
            description="Number of denoising steps. Default: 30; a few-step model's own (SDXL Turbo 1, SDXL Lightning 2/4/8 as the model, LCM 4), also when an LCM or Lightning LoRA is in lora_weights.",  # noqa: E501
            default=None,
            ge=1,
            le=500,
        ),
        guidance_scale: float | None = Input(
            description="Classifier-free guidance scale: how closely to follow the prompt. 0 or 1 turns guidance off (for Turbo/LCM-style models). Default: 7.5 for SD 1.x/2.x, 7.0 for SDXL; a few-step model's own (Turbo and Lightning 0, LCM 1).",  # noqa: E501
            default=None,
            ge=0,
            le=30,
        ),
        prompt_strength: float = Input(
            description="How much of image is replaced in image-to-image and inpainting: 0 keeps it, 1 replaces it. int(num_inference_steps x prompt_strength) denoising steps are run.",  # noqa: E501
            default=0.8,
            ge=0,
            le=1,
        ),
        outpaint_left: int = Input(
            description="Outpainting: pixels to add on the left of image; the new area is generated.",
            default=0,
            ge=0,
            le=1024,
        ),
        outpaint_top: int = Input(
            description="Outpainting: pixels to add above image.", default=0, ge=0, le=1024
        ),
        outpaint_right: int = Input(
            description="Outpainting: pixels to add on the right of image.", default=0, ge=0, le=1024
        ),
        outpaint_bottom: int = Input(
            description="Outpainting: pixels to add below image. The canvas is rounded up to multiples of 8 on the right and bottom.",  # noqa: E501
            default=0,
            ge=0,
            le=1024,
        ),
        scheduler: str = Input(
            description="Sampler. The classic Replicate names, plus AUTOMATIC1111's sampler names. default: the model's own: DPM++ 2M Karras, or a few-step model's (Turbo: K_EULER_ANCESTRAL, Lightning: K_EULER, both with trailing timesteps; LCM: LCM).",  # noqa: E501
            default="default",
            choices=[
                "default",
                "DDIM",
                "K_EULER",
                "K_EULER_ANCESTRAL",
                "DPMSolverMultistep",
                "PNDM",
                "KLMS",
                "DPM++ 2M Karras",
                "DPM++ 2M SDE",
                "DPM++ 2M SDE Karras",
                "DPM2 Karras",
                "DPM2 a Karras",
                "Euler Karras",
                "Heun",
                "LMS Karras",
                "UniPC",
                "DEIS",
                "DDPM",
                "LCM",
            ],
        ),
        seed: int | None = Input(
            description="Random seed. Image i uses seed + i, so any image of a batch can be made again alone with num_outputs=1. Leave blank to draw one at random (it is logged and embedded in each file).",  # noqa: E501
            default=None,
            ge=0,
            le=4294967295,
        ),
        output_format: str = Input(
            description="Image file format.", default="webp", choices=["webp", "jpg", "png"]
        ),
        output_quality: int = Input(
            description="Quality of webp and jpg outputs, 1-100 (ignored for png).",
            default=90,
            ge=1,
            le=100,
        ),
        disable_safety_checker: bool = Input(
            description="Skip the model's safety checker (for models that ship one, such as SD 1.5). When it runs, a flagged image is replaced by a black image, and the logs and the image's metadata say so.",  # noqa: E501
            default=False,
        ),
        lora_weights: str | None = Input(
            description="LoRAs to apply (up to 4), separated by commas or spaces: https URLs of .safetensors files, huggingface.co/<owner>/<repo>[/<file>.safetensors], or Replicate models <owner>/<model>[/<version>]. kohya and diffusers formats for this model's family. Fetched once, then cached.",  # noqa: E501
            default=None,
        ),
        lora_scales: str | None = Input(
            description="Strength of each LoRA in lora_weights, in the same order, separated by commas: one value for all, or one each (-4 to 4; default 1; 0 turns a LoRA off).",  # noqa: E501
            default=None,
        ),
        embeddings: str | None = Input(
            description="Textual-inversion embeddings (up to 8), separated by commas or spaces, each a reference as in lora_weights, optionally as word=<reference>. Write the word in prompt or negative_prompt to use it; it defaults to the file's name (easynegative.safetensors: easynegative). .safetensors in AUTOMATIC1111, diffusers or SDXL (clip_l/clip_g) format.",  # noqa: E501
            default=None,
        ),
        replicate_weights: str | None = Input(
            description="A LoRA trained with this model's cog train (its trained_model.tar, as lora_weights takes it), applied first at scale 1 with its trigger word's embeddings. Replicate fills it in when a trained version runs; leave it empty otherwise.",  # noqa: E501
            default=None,
        ),
        controlnet_1: str | None = Input(
            description="ControlNet 1: a name (canny, depth, openpose, scribble, lineart, softedge, tile; shapes-silhouette for the bundled model), each resolved for this model's family, or a reference as in lora_weights (a diffusers ControlNet repository huggingface.co/<owner>/<repo>, an https URL of a .safetensors file, a Replicate model). It steers the composition by controlnet_1_image in every mode. Fetched once, then cached.",  # noqa: E501
            default=None,
        ),
        controlnet_1_image: Path | None = Input(
            description="The control image of controlnet_1 (URL or data URI): a map (edges, depth, pose, ...) or a photo to preprocess. Fitted to the output size by scaling to cover it and cropping the centre.",  # noqa: E501
            default=None,
        ),
        controlnet_1_conditioning_scale: float = Input(
            description="How strongly controlnet_1 steers: 0 not at all, 1 as trained, up to 4.",
            default=1.0,
            ge=0,
            le=4,
        ),
        controlnet_1_start: float = Input(
            description="The fraction of the denoising steps at which controlnet_1 starts steering (0: from the first).",  # noqa: E501
            default=0.0,
            ge=0,
            le=1,
        ),
        controlnet_1_end: float = Input(
            description="The fraction of the denoising steps at which controlnet_1 stops steering (1: to the last); above controlnet_1_start.",  # noqa: E501
            default=1.0,
            ge=0,
            le=1,
        ),
        controlnet_1_preprocessor: str | None = Input(
            description="What controlnet_1_image goes through: none (it already is the map), canny (edges, see canny_low_threshold), depth (a depth estimator baked in by script/download-weights --preprocessor depth). Default: the named ControlNet's own (canny for canny, depth for depth), else none.",  # noqa: E501
            default=None,
            choices=["none", "canny", "depth"],
        ),
        controlnet_2: str | None = Input(
            description="ControlNet 2, as controlnet_1 (up to three steer together).",
            default=None,
        ),
        controlnet_2_image: Path | None = Input(
            description="The control image of controlnet_2.",
            default=None,
        ),
        controlnet_2_conditioning_scale: float = Input(
            description="How strongly controlnet_2 steers (0-4).",
            default=1.0,
            ge=0,
            le=4,
        ),
        controlnet_2_start: float = Input(
            description="Where controlnet_2 starts steering (0-1).",
            default=0.0,
            ge=0,
            le=1,
        ),
        controlnet_2_end: float = Input(
            description="Where controlnet_2 stops steering (0-1).",
            default=1.0,
            ge=0,
            le=1,
        ),
        controlnet_2_preprocessor: str | None = Input(
            description="What controlnet_2_image goes through (as controlnet_1_preprocessor).",
            default=None,
            choices=["none", "canny", "depth"],
        ),
        controlnet_3: str | None = Input(
            description="ControlNet 3, as controlnet_1 (up to three steer together).",
            default=None,
        ),
        controlnet_3_image: Path | None = Input(
            description="The control image of controlnet_3.",
            default=None,
        ),
        controlnet_3_conditioning_scale: float = Input(
            description="How strongly controlnet_3 steers (0-4).",
            default=1.0,
            ge=0,
            le=4,
        ),
        controlnet_3_start: float = Input(
            description="Where controlnet_3 starts steering (0-1).",
            default=0.0,
            ge=0,
            le=1,
        ),
        controlnet_3_end: float = Input(
            description="Where controlnet_3 stops steering (0-1).",
            default=1.0,
            ge=0,
            le=1,
        ),
        controlnet_3_preprocessor: str | None = Input(
            description="What controlnet_3_image goes through (as controlnet_1_preprocessor).",
            default=None,
            choices=["none", "canny", "depth"],
        ),
        canny_low_threshold: int = Input(
            description="Canny preprocessor: edges weaker than this are dropped (1-255).",
            default=100,
            ge=1,
            le=255,
        ),
        canny_high_threshold: int = Input(
            description="Canny preprocessor: edges stronger than this are always kept (1-255).",
            default=200,
            ge=1,
            le=255,
        ),
        sizing_strategy: str = Input(
            description="Where the output size comes from: auto (the input image's size unless width/height are given, else width/height), width_height, input_image, or controlnet_N_image (that control image's size, rounded to multiples of 8).",  # noqa: E501
            default="auto",
            choices=[
                "auto",
                "width_height",
                "input_image",
                "controlnet_1_image",
                "controlnet_2_image",
                "controlnet_3_image",
            ],
        ),
        return_control_maps: bool = Input(
            description="Also return each ControlNet's preprocessed control map (what it followed), after the images.",  # noqa: E501
            default=False,
        ),
        clip_skip: int = Input(
            description="AUTOMATIC1111's clip skip: 1 uses the text encoder's last layer, 2 the one before it (what many anime-style SD 1.x checkpoints expect), and so on.",  # noqa: E501
            default=1,
            ge=1,
            le=12,
        ),
        hires_scale: float = Input(
            description="Hires fix (text-to-image): draw at width x height, upscale by this factor, and repaint at the larger size with image-to-image, which keeps the layout and avoids the doubled subjects a model draws far above its native size. 1 turns it off. The pixel budget applies to the final size.",  # noqa: E501
            default=1.0,
            ge=1,
            le=4,
        ),
        hires_steps: int | None = Input(
            description="Hires fix: the repaint's num_inference_steps (int(hires_steps x hires_denoising_strength) run). Default (or 0): num_inference_steps.",  # noqa: E501
            default=None,
            ge=0,
            le=500,
        ),
        hires_denoising_strength: float = Input(
            description="Hires fix: how much of the upscaled image is repainted: 0 keeps it, 1 replaces it. Latent upscalers need about 0.5 or more.",  # noqa: E501
            default=0.55,
            ge=0,
            le=1,
        ),
        hires_upscaler: str = Input(
            description="Hires fix: how the first pass is enlarged: its latents (Latent: bilinear, bicubic, nearest-exact) or its decoded image (Lanczos, Nearest).",  # noqa: E501
            default="Latent",
            choices=["Latent", "Latent (bicubic)", "Latent (nearest-exact)", "Lanczos", "Nearest"],
        ),
        refine: str = Input(
            description="SDXL refiner (when refiner weights are loaded): expert_ensemble_refiner lets the base denoise the first high_noise_frac of the steps and the refiner the rest; base_image_refiner refines the base's finished image (strength 0.3, refine_steps).",  # noqa: E501
            default="no_refiner",
            choices=["no_refiner", "expert_ensemble_refiner", "base_image_refiner"],
        ),
        high_noise_frac: float = Input(
            description="expert_ensemble_refiner: the fraction of the schedule the base denoises before the refiner takes over.",  # noqa: E501
            default=0.8,
            ge=0,
            le=1,
        ),
        refine_steps: int | None = Input(
            description="base_image_refiner: the refiner's num_inference_steps (30% of them run). Default: num_inference_steps.",  # noqa: E501
            default=None,
            ge=1,
            le=500,
        ),
        apply_watermark: bool = Input(
            description="Embed SDXL's invisible watermark (invisible-watermark, dwtDctSvd) in images of 256x256 pixels or more, so downstream tools can tell them generated; smaller images say in their metadata that they carry none. Off: the pixels exactly as generated.",  # noqa: E501
            default=True,
        ),
        hf_api_token: Secret | None = Input(
            description="Hugging Face token for private or gated LoRA and embedding repositories; sent to Hugging Face only, never logged. Default: the server's HF_TOKEN.",  # noqa: E501
            default=None,
        ),
        replicate_api_token: Secret | None = Input(
            description="Replicate API token for the weights of private Replicate models in lora_weights or embeddings; sent to Replicate only, never logged. Default: the server's REPLICATE_API_TOKEN.",  # noqa: E501
            default=None,
        ),
    ) -> list[Path]:
        liveness.prediction_started()  # the probe tells a running prediction from a stuck slot
        directory = None
        try:
            # Reading input files and fetching adapters may wait on the network: in threads, so that
            # other predictions go on meanwhile (each thread sees this prediction's context).
            request = await asyncio.to_thread(
                lambda: resolve_request(
                    self.engine.limits,
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    width=width,
                    height=height,
                    num_outputs=num_outputs,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    scheduler=scheduler,
                    clip_skip=clip_skip,
                    hires_scale=hires_scale,
                    hires_steps=hires_steps,
                    hires_denoising_strength=hires_denoising_strength,
                    hires_upscaler=hires_upscaler,
                    refine=refine,
                    high_noise_frac=high_noise_frac,
                    refine_steps=refine_steps,
                    apply_watermark=apply_watermark,
                    seed=seed,
                    output_format=output_format,
                    output_quality=output_quality,
                    image=None if image is None else open_image("image", read_input_file("image", image)),
                    mask=None if mask is None else open_image("mask", read_input_file("mask", mask)),
                    prompt_strength=prompt_strength,
                    outpaint=Outpaint(outpaint_left, outpaint_top, outpaint_right, outpaint_bottom),
                    disable_safety_checker=disable_safety_checker,
                    lora_weights=lora_weights,
                    lora_scales=lora_scales,
                    embeddings=embeddings,
                    replicate_weights=replicate_weights,
                    controlnets=[
                        ControlSlot(
                            model,
                            None if control is None else open_image(name, read_input_file(name, control)),
                            scale,
                            start,
                            end,
                            preprocessor,
                        )
                        for name, model, control, scale, start, end, preprocessor in (
                            (
                                "controlnet_1_image",
                                controlnet_1,
                                controlnet_1_image,
                                controlnet_1_conditioning_scale,
                                controlnet_1_start,
                                controlnet_1_end,
                                controlnet_1_preprocessor,
                            ),
                            (
                                "controlnet_2_image",
                                controlnet_2,
                                controlnet_2_image,
                                controlnet_2_conditioning_scale,
                                controlnet_2_start,
                                controlnet_2_end,
                                controlnet_2_preprocessor,
                            ),
                            (
                                "controlnet_3_image",
                                controlnet_3,
                                controlnet_3_image,
                                controlnet_3_conditioning_scale,
                                controlnet_3_start,
                                controlnet_3_end,
                                controlnet_3_preprocessor,
                            ),
                        )
                    ],
                    sizing_strategy=sizing_strategy,
                    canny_low_threshold=canny_low_threshold,
                    canny_high_threshold=canny_high_threshold,
                    return_control_maps=return_control_maps,
                )
            )
            request = await asyncio.to_thread(self.control_maps.prepare, request)
            for index, image_seed in enumerate(request.seeds):
                log.info("image %d: seed %d", index, image_seed)
            tokens = adapter_tokens(_secret(hf_api_token), _secret(replicate_api_token))
            adapters = await asyncio.to_thread(self.adapters.fetch_for, request, tokens)
            try:
                controlnets = await asyncio.to_thread(self.controlnets.fetch_for, request, tokens)
            except BaseException:
                self.adapters.release(adapters)
                raise
            adapters = dataclasses.replace(adapters, controlnets=controlnets)
            job = self.batcher.submit(request, adapters)
            job.future.add_done_callback(lambda _: self._release(adapters))
            generation = await until_done(job)
            encoding = time.monotonic()
            directory = self.outputs.next()
            paths = await asyncio.to_thread(
                write_outputs,
                generation,
                request,
                self.engine.weights.name,
                directory,
                self.engine.model_hash.short if self.engine.model_hash else None,
            )
            self._record_metrics(
                {**job.timings(), "encode_s": time.monotonic() - encoding, "batch_size": job.batch_size}
            )
            return [Path(path) for path in paths]
        finally:
            if directory is not None:
                self.outputs.finished(directory)
            liveness.prediction_ended()
            # glibc keeps what this prediction freed; give it back once the answer is on its way.
            self.heap.trim_in_background()

    def _release(self, adapters: FetchedAdapters) -> None:
        self.adapters.release(adapters)
        self.controlnets.release(adapters.controlnets)

    def _record_metrics(self, metrics: dict[str, float]) -> None:
        """Where the prediction's time went, in its `metrics` (beside Cog's own predict_time)."""
        try:
            for name, value in metrics.items():
                self.record_metric(name, round(value, 4))
        except Exception as error:  # outside Cog's server (a direct call) there is no scope
            log.debug("metrics not recorded: %s", error)


def _secret(value: Secret | str | None) -> str | None:
    """A Secret input's text (the server gives a Secret; a direct caller may pass a string)."""
    return value.get_secret_value() if isinstance(value, Secret) else value
