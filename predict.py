"""The Cog surface: typed inputs -> one request -> the engine -> image files.

No diffusion logic lives here; see the `sdcog` package. The `Input` declarations use literal
values because `cog build` reads them statically; `tests/test_schema.py` checks that they match
the rules `sdcog.request` enforces.
"""

import logging
import sys

from cog import BasePredictor, Input, Path

from sdcog.engine import Engine
from sdcog.outputs import OutputDirectory, write_outputs
from sdcog.request import resolve_request
from sdcog.weights import resolve_weights_dir

log = logging.getLogger("sdcog")


class Predictor(BasePredictor):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.engine = Engine.load(resolve_weights_dir())
        self.outputs = OutputDirectory()

    def predict(
        self,
        prompt: str = Input(
            description="What the image should show.",
            default="a photo of an astronaut riding a horse on mars",
        ),
        negative_prompt: str | None = Input(description="What the image should not show.", default=None),
        width: int | None = Input(
            description="Width in pixels, a multiple of 8. Default: the model's native size "
            "(512 for SD 1.x, 512 or 768 for SD 2.x, 1024 for SDXL). width x height x num_outputs "
            "must fit the model family's pixel budget.",
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
            description="Number of denoising steps. Default: 30.", default=None, ge=1, le=500
        ),
        guidance_scale: float | None = Input(
            description="Classifier-free guidance scale: how closely to follow the prompt. 0 or 1 turns "
            "guidance off (for Turbo/LCM-style models). Default: 7.5 for SD 1.x/2.x, 7.0 for SDXL.",
            default=None,
            ge=0,
            le=30,
        ),
        scheduler: str = Input(
            description="Sampler. The classic Replicate names, plus AUTOMATIC1111's sampler names.",
            default="DPM++ 2M Karras",
            choices=[
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
            description="Random seed. Image i uses seed + i, so any image of a batch can be made again "
            "alone with num_outputs=1. Leave blank to draw one at random (it is logged and embedded "
            "in each file).",
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
    ) -> list[Path]:
        request = resolve_request(
            self.engine.limits,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
        )
        for index, image_seed in enumerate(request.seeds):
            log.info("image %d: seed %d", index, image_seed)
        images = self.engine.text_to_image(request)
        paths = write_outputs(images, request, self.engine.weights.name, self.outputs.next())
        return [Path(path) for path in paths]
