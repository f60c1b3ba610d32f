"""Output files: encoding, embedded generation metadata, naming.

Every image carries its parameters in AUTOMATIC1111's infotext format, which its "PNG Info" tab and
most image tools read: a PNG `parameters` text chunk, or for JPEG and WebP the same text in the
EXIF UserComment tag (encoded as AUTOMATIC1111 writes it: "UNICODE\\0" + UTF-16BE). The infotext
format has no escapes, so each prompt is written there as one line that encodes to the same tokens
(`infotext_line`); the prompts exactly as sent are kept beside it as JSON, in a PNG `sdcog` text
chunk or the EXIF MakerNote ("sdcog\\0" + UTF-8).

Encoder settings favour speed, since encoding is on the path of every answer: PNG at
compress_level 1 (a default-level PNG of 1024x1024 costs 150-330 ms on two cores, level 1 about a
third of that for a ~10% larger file) and WebP at method 0 (measured at 1024x1024, quality 90:
48 ms and 289 kB, against 131 ms and 287 kB at Pillow's default method 4). The images of a
prediction are encoded in parallel threads (Pillow's encoders release the GIL).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdcog import __version__
from sdcog.fetch.images import MASK_BLUR_PX
from sdcog.generate.generation import Generation
from sdcog.generate.safety import SafetyVerdict
from sdcog.resolve.request import GenerationRequest, Mode
from sdcog.resolve.schedulers import SCHEDULERS
from sdcog.write import watermark
from sdcog.write.infotext import format_infotext

if TYPE_CHECKING:  # only a type here: loras imports diffusers, which encoding does not need
    from sdcog.generate.controlnets import LoadedControlNet
    from sdcog.generate.embeddings import AppliedEmbedding
    from sdcog.generate.loras import AppliedLora

EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
EXIF_MAKER_NOTE = 0x927C
_UNICODE_PREFIX = b"UNICODE\x00"
EXACT_PNG_CHUNK = "sdcog"
JPEG_EXIF_MAX_BYTES = 65_533
"""What one JPEG APP1 segment holds (its "Exif\\0\\0" header included)."""
_EXACT_PREFIX = b"sdcog\x00"

FILE_EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 0
ENCODER_THREADS = min(4, os.cpu_count() or 1)
OUTPUT_GRACE_ENV = "SDCOG_OUTPUT_GRACE_S"
DEFAULT_OUTPUT_GRACE_S = 120.0


def _exif_with_comment(text: str, exact: str | None) -> Image.Exif:
    exif = Image.Exif()
    exif_ifd = exif.get_ifd(EXIF_IFD_POINTER)
    exif_ifd[EXIF_USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf-16-be")
    if exact is not None:
        exif_ifd[EXIF_MAKER_NOTE] = _EXACT_PREFIX + exact.encode("utf-8")
    return exif


def exact_texts_json(prompt: str, negative_prompt: str) -> str:
    """The prompts exactly as sent, as JSON (`{"prompt": ..., "negative_prompt": ...}`)."""
    return json.dumps({"prompt": prompt, "negative_prompt": negative_prompt}, ensure_ascii=False)


def read_exact_texts(path: Path) -> dict[str, str] | None:
    """The prompts exactly as sent, from an output file (PNG chunk `sdcog`, or EXIF MakerNote)."""
    with Image.open(path) as image:
        if EXACT_PNG_CHUNK in image.info:
            return json.loads(image.info[EXACT_PNG_CHUNK])
        note = image.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_MAKER_NOTE)
    if not isinstance(note, bytes) or not note.startswith(_EXACT_PREFIX):
        return None
    return json.loads(note[len(_EXACT_PREFIX) :].decode("utf-8"))


def read_infotext(path: Path) -> str | None:
    """The generation parameters embedded in an output file, whatever its format."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    if comment is None:
        return None
    if comment.startswith(_UNICODE_PREFIX):
        return comment[len(_UNICODE_PREFIX) :].decode("utf-16-be")
    return comment.split(b"\x00", 8)[-1].decode("utf-8", errors="replace")


def save_image(
    image: Image.Image, path: Path, output_format: str, quality: int, infotext: str, exact: str = "{}"
) -> Path:
    """Encode `image` to `path` in `output_format` with `infotext` embedded, and `exact` (see
    `exact_texts_json`) beside it."""
    if output_format == "png":
        metadata = PngInfo()
        metadata.add_text("parameters", infotext)
        metadata.add_text(EXACT_PNG_CHUNK, exact)
        image.save(path, format="PNG", pnginfo=metadata, compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpg":
        exif = _exif_with_comment(infotext, exact).tobytes()
        if len(exif) > JPEG_EXIF_MAX_BYTES:  # the exact texts do not fit beside the infotext
            exif = _exif_with_comment(infotext, None).tobytes()
        image.convert("RGB").save(path, format="JPEG", quality=quality, exif=exif)
    elif output_format == "webp":
        image.save(
            path,
            format="WEBP",
            quality=quality,
            method=WEBP_METHOD,
            exif=_exif_with_comment(infotext, exact).tobytes(),
        )
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return path


def output_path(directory: Path, index: int, output_format: str) -> Path:
    """`out-<index>.<ext>` in `directory`; nothing the user sends can make it point elsewhere."""
    path = directory / f"out-{int(index)}.{FILE_EXTENSIONS[output_format]}"
    if path.resolve().parent != directory.resolve():
        raise ValueError(f"output path {path} is outside the output directory {directory}")
    return path


def generation_infotext(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    safety: SafetyVerdict | None = None,
    loras: Sequence[AppliedLora] = (),
    embeddings: Sequence[AppliedEmbedding] = (),
    controlnets: Sequence[LoadedControlNet] = (),
    model_hash: str | None = None,
    watermark: str | None = None,
) -> str:
    """The infotext of one image of `request`, generated from `seed` (`safety`: the checker's verdict;
    `loras`: the LoRAs applied, as AUTOMATIC1111's `Lora hashes`, with their scales; `embeddings`:
    those the prompts used, as its `TI hashes`)."""
    fields = {
        "Steps": request.num_inference_steps,
        "Sampler": SCHEDULERS[request.scheduler].infotext_name,
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Mode": request.mode,
    }
    if request.clip_skip > 1:
        fields["Clip skip"] = request.clip_skip
    if request.few_step:
        fields["Few-step"] = request.few_step.label
        if request.few_step.timestep_spacing:
            fields["Timestep spacing"] = request.few_step.timestep_spacing
    if request.mode != Mode.TEXT_TO_IMAGE:
        fields["Denoising strength"] = f"{request.prompt_strength:g}"
    if request.mode == Mode.INPAINT:
        fields["Mask blur"] = MASK_BLUR_PX
    if request.outpaint:
        fields["Outpaint"] = request.outpaint.describe()
    for second_pass in (request.hires, request.refine):
        if second_pass:
            fields.update(second_pass.infotext())
    if loras:
        fields["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash}" for lora in loras)
        fields["Lora scales"] = ", ".join(f"{lora.name}: {lora.scale:g}" for lora in loras)
    if embeddings:
        fields["TI hashes"] = ", ".join(f"{embedding.name}: {embedding.hash}" for embedding in embeddings)
    for index, controlnet in enumerate(controlnets):
        fields[f"ControlNet {index}"] = controlnet_infotext(controlnet)
    fields["Safety checker"] = None if safety is None else safety.label
    fields["Watermark"] = watermark
    fields["Version"] = f"sdcog {__version__}"
    return format_infotext(request.prompt, request.negative_prompt, fields)


def controlnet_infotext(controlnet: LoadedControlNet) -> str:
    """One ControlNet unit as AUTOMATIC1111's sd-webui-controlnet writes it (`Module`, `Model` with
    its short hash, `Weight`, `Guidance Start`/`End`, Canny's thresholds as `Threshold A`/`B`)."""
    control = controlnet.control
    parts = {
        "Module": control.preprocessor,
        "Model": f"{control.name} [{controlnet.hash[:8]}]",
        "Weight": f"{control.conditioning_scale:g}",
        "Resize Mode": "Crop and Resize",
        "Guidance Start": f"{control.start:g}",
        "Guidance End": f"{control.end:g}",
    }
    if control.preprocessor == "canny":
        parts["Threshold A"], parts["Threshold B"] = control.canny_thresholds
    return ", ".join(f"{key}: {value}" for key, value in parts.items())


def write_outputs(
    generation: Generation,
    request: GenerationRequest,
    model_name: str,
    directory: Path,
    model_hash: str | None = None,
) -> list[Path]:
    """Encode each image of `generation` into `directory` with its own parameters embedded: the
    request's, its seed, the safety checker's verdict (when the model has a checker), and the LoRAs
    and embeddings the generation applied."""
    directory.mkdir(parents=True, exist_ok=True)
    images, loras, embeddings = generation.images, generation.loras, generation.embeddings
    verdicts = list(generation.safety) if generation.safety is not None else [None] * len(images)
    exact = exact_texts_json(request.prompt, request.negative_prompt)

    def encode(index: int) -> Path:
        image, mark = images[index], None
        if request.apply_watermark:
            mark, image = watermark.infotext(image), watermark.apply_watermark(image)
        return save_image(
            image,
            output_path(directory, index, request.output_format),
            request.output_format,
            request.output_quality,
            generation_infotext(
                request,
                request.seeds[index],
                model_name,
                verdicts[index],
                loras,
                embeddings,
                generation.controlnets,
                model_hash,
                mark,
            ),
            exact,
        )

    if len(images) != len(request.seeds) or len(verdicts) != len(images):
        raise ValueError(f"{len(images)} images for {len(request.seeds)} seeds and {len(verdicts)} verdicts")
    maps = write_control_maps(generation, request, directory) if request.return_control_maps else []
    if len(images) == 1:
        return [encode(0), *maps]
    with ThreadPoolExecutor(min(ENCODER_THREADS, len(images)), thread_name_prefix="encode") as pool:
        return list(pool.map(encode, range(len(images)))) + maps


def write_control_maps(generation: Generation, request: GenerationRequest, directory: Path) -> list[Path]:
    """Each ControlNet's map as the model read it, `control-<slot>.png` (lossless: a map's edges
    are what the user checks), with what made it in its metadata."""
    paths = []
    for controlnet in generation.controlnets:
        control = controlnet.control
        path = directory / f"control-{control.field.removeprefix('controlnet_')}.png"
        text = f"{control.field} map: {controlnet_infotext(controlnet)}"
        paths.append(save_image(control.control_map, path, "png", 100, text))
    return paths


class OutputDirectory:
    """A fresh directory per prediction, removed `grace` seconds after its prediction finished.

    Cog reads and sends a prediction's files after `predict()` returns, while other predictions
    may be running, so no directory is removed while its prediction runs or in the `grace` seconds
    after it ends (SDCOG_OUTPUT_GRACE_S, default 120: far longer than sending a few images takes).
    Expired directories are removed when the next prediction starts.
    """

    def __init__(
        self,
        root: Path | None = None,
        grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root = root or Path(tempfile.gettempdir()) / "sdcog-outputs"
        if grace is None:
            grace = float(os.environ.get(OUTPUT_GRACE_ENV) or DEFAULT_OUTPUT_GRACE_S)
        self.grace = grace
        self._clock = clock
        self._lock = threading.Lock()
        self._finished: dict[Path, float] = {}

    def next(self) -> Path:
        """A new directory for a prediction that starts now; expired ones are removed first."""
        now = self._clock()
        with self._lock:
            expired = [path for path, ended in self._finished.items() if now - ended >= self.grace]
            for path in expired:
                del self._finished[path]
        for path in expired:
            shutil.rmtree(path, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="prediction-", dir=self.root))

    def finished(self, directory: Path) -> None:
        """The prediction that wrote `directory` has returned: its files may go after `grace`."""
        with self._lock:
            self._finished[directory] = self._clock()
