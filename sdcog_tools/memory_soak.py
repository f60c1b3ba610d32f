"""`script/memory-soak`: does resident memory stay flat over many varied predictions?

Starts Cog's real HTTP server (as `script/serve` does) on a model, sends N consecutive
predictions that cycle through sizes, schedulers, batch sizes, output formats and modes
(text-to-image, image-to-image, inpainting, outpainting, and refused inputs, whose error paths
can leak too), every other one steered by ControlNets (one, or two with their maps returned: by
default the bundled shapes-silhouette ControlNet, `--controlnet none` leaves them out), and
samples the resident memory of the server's prediction worker after each:

    script/memory-soak [--count 200] [--warmup 40] [--max-growth 5] [--json soak.json]
                       [--weights DIR] [--env MALLOC_ARENA_MAX=2]

The variation is one fixed cycle of CYCLE_LENGTH (40) predictions, repeated; only the seed and
the prompt change from one cycle to the next. The default warm-up is that one cycle: by its end
every size x mode x batch size x scheduler combination that will ever run has run once, so
every shape-keyed cache (oneDNN primitives, allocator pools, lazily imported scheduler and
pipeline modules) is filled, and whatever grows afterwards is memory kept per prediction, not
a first use. With N - warm-up a multiple of the cycle, the first and the last post-warm-up
samples are taken after the same request, so "growth" compares like with like. The slope of
a least-squares line through all post-warm-up samples (MiB per 100 predictions) is reported as
well: it is less sensitive to where a sample falls in the allocator's sawtooth.

Exit status 1 when RSS grew by more than --max-growth percent after warm-up, or when a
prediction did not end as planned (a refused input must fail naming its field, every other
one must succeed with num_outputs images), or the worker process changed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from PIL import Image, ImageDraw

from sdcog.model.weights import BUNDLED_MODEL_DIR, PROJECT_ROOT, WEIGHTS_ENV
from sdcog.resolve.control import BUNDLED_CONTROLNET
from sdcog.resolve.schedulers import SCHEDULER_NAMES
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import CogServer, running_server

SCHEMA_PATH = PROJECT_ROOT / ".cog" / "openapi_schema.json"
MIB = 2**20

TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT, OUTPAINT, REFUSED = (
    "txt2img",
    "img2img",
    "inpaint",
    "outpaint",
    "refused",
)
MODES = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT, OUTPAINT)
# Nine output sizes, multiples of 8 from 64 to 192, square and not (4 modes x 9 sizes = 36).
SIZES = (
    (64, 64),
    (128, 96),
    (96, 160),
    (192, 192),
    (152, 64),
    (64, 184),
    (120, 120),
    (176, 136),
    (80, 112),
)
FORMATS = ("webp", "png", "jpg")
GUIDANCE_SCALES = (7.5, 4.0, 1.0)  # 1.0 turns classifier-free guidance off: a half-size UNet batch
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
GENERATED_PER_CYCLE = len(MODES) * len(SIZES)  # 36: every mode at every size once
REFUSED_EVERY = len(SIZES)  # one refused input after every 9 generated ones
CYCLE_LENGTH = GENERATED_PER_CYCLE + GENERATED_PER_CYCLE // REFUSED_EVERY  # 40
DEFAULT_COUNT = 200
DEFAULT_MAX_GROWTH_PCT = 5.0
TABLE_EVERY = 20


@dataclass(frozen=True)
class Planned:
    """One prediction of the soak: its inputs and the outcome it must have."""

    index: int
    mode: str
    inputs: dict[str, Any]
    num_outputs: int = 0
    size: tuple[int, int] = (0, 0)
    """The output size asked for (an outpainted canvas may come out a little larger)."""
    expected_error: str | None = None
    """For a refused input: a fragment the failed prediction's error must contain."""
    control_maps: int = 0
    """Control maps returned after the images (return_control_maps)."""

    @property
    def controlnets(self) -> int:
        return sum(1 for slot in (1, 2, 3) if f"controlnet_{slot}" in self.inputs)

    def describe(self) -> str:
        if self.mode == REFUSED:
            return f"refused ({self.expected_error})"
        steered = f" +{self.controlnets} ControlNet" if self.controlnets else ""
        return (
            f"{self.mode} {self.size[0]}x{self.size[1]} x{self.num_outputs} {self.inputs['scheduler']} "
            f"{self.inputs['num_inference_steps']} steps {self.inputs['output_format']}{steered}"
        )


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _picture(width: int, height: int, variant: int) -> Image.Image:
    """A coloured shape on a background, like the bundled model's world."""
    palette = ((200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40))
    image = Image.new("RGB", (width, height), palette[variant % 4])
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    ImageDraw.Draw(image).ellipse(box, fill=palette[(variant + 2) % 4])
    return image


def _mask(width: int, height: int) -> Image.Image:
    """White (repaint) over the right half's middle, black (keep) elsewhere."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 2, height // 4, width - 1, 3 * height // 4), fill=255)
    return mask


def _refused(position: int) -> tuple[dict[str, Any], str]:
    """The refused inputs, in turn: each fails inside the worker with a field-named error."""
    picture = _png_data_uri(_picture(96, 64, position))
    refused = (
        ({"width": 100, "height": 64}, "width: must be a multiple of 8"),
        ({"width": 2048, "height": 2048, "num_outputs": 4}, "width/height/num_outputs"),
        (
            {"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()},
            "image: is not a readable",
        ),
        ({"image": picture, "mask": _png_data_uri(Image.new("L", (96, 64), 0))}, "mask: is all black"),
    )
    return refused[position % len(refused)]


def _silhouette(width: int, height: int, variant: int) -> Image.Image:
    """Where the object goes, as the bundled ControlNet reads it: white on black."""
    image = Image.new("RGB", (width, height))
    left, top = (variant * 7) % max(1, width // 2), (variant * 5) % max(1, height // 2)
    ImageDraw.Draw(image).ellipse((left, top, left + width // 2, top + height // 2), fill=(255, 255, 255))
    return image


def _generated(k: int, controlnet: str | None = BUNDLED_CONTROLNET) -> Planned:
    """Generated prediction `k` (0-35) of the cycle, without its prompt and seed.

    The mode follows k mod 4 and the size k mod 9, so the 36 cover every mode at every size; the
    batch size is the same for 9 in a row (each size once); the scheduler follows k mod 18, so
    every scheduler runs twice, in two different modes. With `controlnet`, every other one is
    steered by it (k + k // 4 odd: alternating with unsteered ones, each mode both ways); those in
    the second and fourth eight by two of it, at other scales and windows, with their maps returned.
    """
    mode = MODES[k % len(MODES)]
    width, height = SIZES[k % len(SIZES)]
    num_outputs = 1 + (k // len(SIZES)) % 4
    inputs: dict[str, Any] = {
        "scheduler": SCHEDULER_NAMES[k % len(SCHEDULER_NAMES)],
        "num_inference_steps": 2 + k % 5,
        "num_outputs": num_outputs,
        "guidance_scale": GUIDANCE_SCALES[(k // 2) % len(GUIDANCE_SCALES)],
        "output_format": FORMATS[(k // 4) % len(FORMATS)],
        "output_quality": 60 + (k * 7) % 40,
    }
    if k % 5 == 0:
        inputs["negative_prompt"] = "a green square"
    if mode == TEXT_TO_IMAGE:
        inputs.update(width=width, height=height)
    elif mode == IMAGE_TO_IMAGE:
        # An odd-sized input: the server rounds it to (width, height), multiples of 8.
        inputs["image"] = _png_data_uri(_picture(width + 3, height - 3, k))
        inputs["prompt_strength"] = 0.5 + 0.1 * (k % 5)
    elif mode == INPAINT:
        inputs["image"] = _png_data_uri(_picture(width, height, k))
        # Every other mask at half size: the server resizes it to the image.
        inputs["mask"] = _png_data_uri(_mask(width // (1 + k % 2), height // (1 + k % 2)))
        inputs["prompt_strength"] = 0.9
    else:  # OUTPAINT: a source at least 64 a side, grown to about (width, height).
        source_width, source_height = max(64, width - 32), max(64, height - 32)
        extra_width, extra_height = max(8, width - source_width), max(8, height - source_height)
        inputs["image"] = _png_data_uri(_picture(source_width, source_height, k))
        inputs.update(
            outpaint_left=extra_width // 2,
            outpaint_right=extra_width - extra_width // 2 + 3,  # the canvas rounds up to 8
            outpaint_top=extra_height // 2,
            outpaint_bottom=extra_height - extra_height // 2,
            prompt_strength=1.0,
        )
    maps = 0
    if controlnet is not None and (k + k // 4) % 2 == 1:
        inputs.update(
            controlnet_1=controlnet, controlnet_1_image=_png_data_uri(_silhouette(width, height, k))
        )
        if (k // 8) % 2 == 1:
            inputs.update(
                controlnet_2=controlnet,
                controlnet_2_image=_png_data_uri(_silhouette(width + 16, height, k + 1)),
                controlnet_2_conditioning_scale=0.5,
                controlnet_2_start=0.2,
                controlnet_2_end=0.8,
                return_control_maps=True,
            )
            maps = 2
    # Image modes leave width and height out: the output follows the image.
    return Planned(-1, mode, inputs, num_outputs, (width, height), control_maps=maps)


def build_cycle(controlnet: str | None = BUNDLED_CONTROLNET) -> list[Planned]:
    """The CYCLE_LENGTH predictions, in order: 9 generated, 1 refused, four times."""
    cycle: list[Planned] = []
    for k in range(GENERATED_PER_CYCLE):
        cycle.append(_generated(k, controlnet))
        if (k + 1) % REFUSED_EVERY == 0:
            inputs, expected = _refused(k // REFUSED_EVERY)
            cycle.append(Planned(-1, REFUSED, inputs, expected_error=expected))
    assert len(cycle) == CYCLE_LENGTH
    return cycle


def plan(count: int, controlnet: str | None = BUNDLED_CONTROLNET) -> list[Planned]:
    """The first `count` predictions of the soak: the cycle repeated, with a new seed and prompt each."""
    cycle = build_cycle(controlnet)
    planned = []
    for index in range(count):
        planned_in_cycle = cycle[index % len(cycle)]
        colour, background = COLOURS[index % 8], COLOURS[(index * 3 + 1) % 8]
        if background == colour:
            background = COLOURS[(index * 3 + 2) % 8]
        prompt = f"a {colour} {SHAPES[index % 3]} on a {background} background"
        inputs = {"prompt": prompt, "seed": index, **planned_in_cycle.inputs}
        planned.append(dataclasses.replace(planned_in_cycle, index=index, inputs=inputs))
    return planned


# Memory of the server's processes.


@dataclass(frozen=True)
class Worker:
    pid: int
    cmdline: str
    evidence: str
    """Why this process is the one holding the model."""


def find_worker(server_pid: int, weights_dir: Path) -> Worker:
    """The server's descendant that runs predict(): the one mapping the model's weight files.

    Cog's server (`python -m cog.server.http`) starts one worker (`coglet.server._run_worker()`),
    which imports predict.py and loads the model in setup(); safetensors files stay memory-mapped
    there. Falls back to the descendant with the most resident memory that maps libtorch.
    """
    server = psutil.Process(server_pid)
    descendants = server.children(recursive=True)
    if not descendants:
        raise RuntimeError(f"the Cog server (pid {server_pid}) has no worker process")
    weights_prefix = str(Path(weights_dir).resolve())
    torch_mappers = []
    for process in descendants:
        try:
            paths = {mapping.path for mapping in process.memory_maps()}
            cmdline = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        weights = sorted(path for path in paths if path.startswith(weights_prefix))
        if weights:
            shown = ", ".join(os.path.relpath(path, weights_prefix) for path in weights[:3])
            return Worker(process.pid, cmdline, f"maps {len(weights)} weight file(s): {shown}")
        if any("libtorch" in Path(path).name for path in paths):
            torch_mappers.append((process.memory_info().rss, process.pid, cmdline))
    if torch_mappers:
        rss, pid, cmdline = max(torch_mappers)
        return Worker(
            pid, cmdline, f"maps libtorch, largest RSS ({rss / MIB:.0f} MiB); no weight file mapped"
        )
    raise RuntimeError(f"no descendant of the Cog server (pid {server_pid}) has loaded torch")


@dataclass(frozen=True)
class MemorySample:
    worker_rss_mib: float
    worker_uss_mib: float | None
    tree_rss_mib: float
    """Server process plus all its descendants (shared pages counted in each)."""
    worker_pid_alive: bool


def sample_memory(server_pid: int, worker_pid: int) -> MemorySample:
    server = psutil.Process(server_pid)
    tree_rss = server.memory_info().rss
    worker_rss, worker_uss, alive = 0, None, False
    for process in server.children(recursive=True):
        try:
            if process.pid == worker_pid:
                # USS reads /proc/PID/smaps: some 6-10 ms, between predictions.
                info = process.memory_full_info()
                worker_rss, worker_uss, alive = info.rss, info.uss, True
                tree_rss += info.rss
            else:
                tree_rss += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return MemorySample(
        worker_rss_mib=worker_rss / MIB,
        worker_uss_mib=None if worker_uss is None else worker_uss / MIB,
        tree_rss_mib=tree_rss / MIB,
        worker_pid_alive=alive,
    )


# The soak.


@dataclass
class Sample:
    index: int
    mode: str
    description: str
    status: str
    ok: bool
    """The prediction ended as planned."""
    problem: str | None
    seconds: float
    worker_rss_mib: float
    worker_uss_mib: float | None
    tree_rss_mib: float


@dataclass
class SoakRecord:
    count: int
    warmup: int
    cycle_length: int
    weights: str
    worker: dict[str, Any]
    server_env: dict[str, str]
    baseline: dict[str, float]
    """Memory once the server was READY, before the first prediction."""
    samples: list[Sample] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    platform: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_outcome(planned: Planned, status_code: int, body: Mapping[str, Any]) -> str | None:
    """None when the prediction ended as planned, else what went wrong."""
    if status_code != 200:
        return f"HTTP {status_code}: {str(body)[:300]}"
    status, error = body.get("status"), body.get("error")
    if planned.expected_error is not None:
        if status != "failed":
            return f"a refused input ended {status!r}, not 'failed'"
        if planned.expected_error not in (error or ""):
            return f"error {error!r} does not contain {planned.expected_error!r}"
        return None
    if status != "succeeded":
        return f"ended {status!r}: {error}"
    outputs = body.get("output") or []
    if len(outputs) != planned.num_outputs + planned.control_maps:
        return f"{len(outputs)} outputs, expected {planned.num_outputs + planned.control_maps}"
    return None


def run_soak(
    server: CogServer,
    weights_dir: Path,
    count: int = DEFAULT_COUNT,
    warmup: int = CYCLE_LENGTH,
    server_env: Mapping[str, str] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    controlnet: str | None = BUNDLED_CONTROLNET,
) -> SoakRecord:
    """Send the first `count` planned predictions to `server`, sampling memory after each."""
    started = time.perf_counter()
    server_pid = server.process.pid
    worker = find_worker(server_pid, weights_dir)
    before = sample_memory(server_pid, worker.pid)
    record = SoakRecord(
        count=count,
        warmup=warmup,
        cycle_length=CYCLE_LENGTH,
        weights=str(weights_dir),
        worker=asdict(worker),
        server_env=dict(server_env or {}),
        baseline={"worker_rss_mib": before.worker_rss_mib, "tree_rss_mib": before.tree_rss_mib},
        platform=platform_info(),
    )
    for planned in plan(count, controlnet):
        sent = time.perf_counter()
        response = server.predict(planned.inputs)
        seconds = time.perf_counter() - sent
        try:
            body = response.json()
        except ValueError:
            body = {"text": response.text[:300]}
        problem = check_outcome(planned, response.status_code, body)
        memory = sample_memory(server_pid, worker.pid)
        if not memory.worker_pid_alive:
            problem = (problem + "; " if problem else "") + f"worker pid {worker.pid} is gone"
        sample = Sample(
            index=planned.index,
            mode=planned.mode,
            description=planned.describe(),
            status=str(body.get("status", response.status_code)),
            ok=problem is None,
            problem=problem,
            seconds=round(seconds, 3),
            worker_rss_mib=round(memory.worker_rss_mib, 2),
            worker_uss_mib=None if memory.worker_uss_mib is None else round(memory.worker_uss_mib, 2),
            tree_rss_mib=round(memory.tree_rss_mib, 2),
        )
        record.samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
    uss = [sample.worker_uss_mib for sample in record.samples]
    record.summary = {
        "worker_rss": summarize([sample.worker_rss_mib for sample in record.samples], warmup),
        "worker_uss": summarize(uss, warmup) if None not in uss else None,
        "tree_rss": summarize([sample.tree_rss_mib for sample in record.samples], warmup),
        "unexpected_outcomes": sum(not sample.ok for sample in record.samples),
    }
    record.wall_seconds = round(time.perf_counter() - started, 1)
    return record


def slope(values: Sequence[float]) -> float:
    """The least-squares slope of `values` against their index (units per sample)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    variance = sum((x - mean_x) ** 2 for x in range(n))
    return covariance / variance


def summarize(values: Sequence[float], warmup: int) -> dict[str, Any]:
    """Growth after warm-up: from the sample taken after prediction `warmup` to the last one.

    `after_warmup` is the sample after the warm-up's last prediction (index warmup - 1), or the
    first sample when there is no warm-up; the slope is fitted to that sample and all later ones.
    """
    first = max(warmup - 1, 0)
    settled = list(values[first:])
    if len(settled) < 2:
        return {"samples_after_warmup": max(len(settled) - 1, 0), "growth_pct": None, "slope_per_100": None}
    start, end = settled[0], settled[-1]
    return {
        "samples_after_warmup": len(settled) - 1,
        "after_warmup_mib": round(start, 2),
        "end_mib": round(end, 2),
        "max_mib": round(max(values), 2),
        "max_after_warmup_mib": round(max(settled), 2),
        "growth_pct": round(100 * (end - start) / start, 3),
        "slope_per_100": round(100 * slope(settled), 3),
    }


def failures(record: SoakRecord, max_growth_pct: float) -> list[str]:
    """Why the soak fails (empty when it passes): memory growth over the limit, or unplanned outcomes."""
    reasons = []
    growth = record.summary["worker_rss"]["growth_pct"]
    if growth is not None and growth > max_growth_pct:
        reasons.append(f"worker RSS grew {growth:.2f}% after warm-up (limit {max_growth_pct:g}%)")
    for sample in record.samples:
        if not sample.ok:
            reasons.append(f"prediction {sample.index} ({sample.description}): {sample.problem}")
    return reasons


def platform_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": importlib.metadata.version("torch"),
        "libc": " ".join(platform.libc_ver()),
    }


# The command line.


def _format_row(sample: Sample, elapsed: float) -> str:
    uss = "-" if sample.worker_uss_mib is None else f"{sample.worker_uss_mib:8.1f}"
    return (
        f"{sample.index + 1:5d} {sample.worker_rss_mib:9.1f} {uss:>8} {sample.tree_rss_mib:9.1f} "
        f"{elapsed:7.1f}  {sample.description}"
    )


def _format_summary(name: str, summary: Mapping[str, Any] | None) -> str:
    if not summary or summary["growth_pct"] is None:
        return f"{name}: too few samples after warm-up"
    return (
        f"{name}: after warm-up {summary['after_warmup_mib']:.1f} MiB, end {summary['end_mib']:.1f} MiB, "
        f"max {summary['max_mib']:.1f} MiB, growth {summary['growth_pct']:+.2f}%, "
        f"slope {summary['slope_per_100']:+.2f} MiB/100 predictions"
    )


def _parse_env(values: Sequence[str]) -> dict[str, str]:
    environment = {}
    for value in values:
        name, equals, setting = value.partition("=")
        if not equals or not name:
            raise argparse.ArgumentTypeError(f"--env takes NAME=VALUE, got {value!r}")
        environment[name] = setting
    return environment


def default_weights(environ: Mapping[str, str] = os.environ) -> Path:
    """$MODEL_WEIGHTS when set, else the bundled model (never weights/: sizes here suit small models)."""
    configured = environ.get(WEIGHTS_ENV, "").strip()
    return Path(configured).expanduser() if configured else BUNDLED_MODEL_DIR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/memory-soak",
        description=(
            "Send many varied predictions to Cog's HTTP server and check that the prediction "
            "worker's resident memory stays flat after warm-up."
        ),
    )
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="predictions to send (200)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=CYCLE_LENGTH,
        help=f"predictions before the baseline sample: one cycle of the variation ({CYCLE_LENGTH})",
    )
    parser.add_argument(
        "--max-growth",
        type=float,
        default=DEFAULT_MAX_GROWTH_PCT,
        help="largest RSS growth after warm-up that passes, in percent (5)",
    )
    parser.add_argument("--json", type=Path, help="write every sample and the summary here")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="diffusers pipeline directory (default: $MODEL_WEIGHTS, else the bundled models/shapes-sd)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the server and its worker, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        help="the ControlNet every other prediction uses (a name or reference; default: the bundled "
        "shapes-silhouette on the bundled model, none on others; none leaves them out)",
    )
    parser.add_argument("--every", type=int, default=TABLE_EVERY, help="print a row every N predictions (20)")
    arguments = parser.parse_args(argv)
    if arguments.count < arguments.warmup + 2:
        parser.error(f"--count must be at least --warmup + 2 ({arguments.warmup + 2})")
    try:
        server_env = _parse_env(arguments.env)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    weights_dir = (arguments.weights or default_weights()).resolve()
    if not (weights_dir / "model_index.json").is_file():
        parser.error(f"{weights_dir} is not a diffusers pipeline directory (no model_index.json)")

    controlnet = arguments.controlnet
    if controlnet is None:
        controlnet = BUNDLED_CONTROLNET if weights_dir == BUNDLED_MODEL_DIR.resolve() else "none"
    controlnet = None if controlnet == "none" else controlnet
    write_schema(SCHEMA_PATH)
    print(
        f"memory-soak: {arguments.count} predictions on {weights_dir}, warm-up {arguments.warmup} "
        f"(cycle {CYCLE_LENGTH})" + (f", server env {server_env}" if server_env else ""),
        flush=True,
    )
    started = time.perf_counter()
    with running_server(PROJECT_ROOT, env={WEIGHTS_ENV: str(weights_dir), **server_env}) as server:
        ready = time.perf_counter() - started
        print(f"server ready in {ready:.1f} s; memory in MiB (RSS, USS of the worker; RSS of the tree)")
        print(f"{'pred':>5} {'rss':>9} {'uss':>8} {'tree rss':>9} {'elapsed':>7}  last prediction")

        def show(sample: Sample) -> None:
            number = sample.index + 1
            if number % arguments.every == 0 or number == arguments.warmup or not sample.ok:
                print(_format_row(sample, time.perf_counter() - started), flush=True)

        record = run_soak(
            server,
            weights_dir,
            count=arguments.count,
            warmup=arguments.warmup,
            server_env=server_env,
            on_sample=show,
            controlnet=controlnet,
        )
    worker = record.worker
    print(f"worker: pid {worker['pid']} `{worker['cmdline']}` ({worker['evidence']})")
    print(
        f"before the first prediction: worker RSS {record.baseline['worker_rss_mib']:.1f} MiB, "
        f"tree RSS {record.baseline['tree_rss_mib']:.1f} MiB"
    )
    print(_format_summary("tree RSS", record.summary["tree_rss"]))
    print(_format_summary("worker USS", record.summary["worker_uss"]))
    print(_format_summary("worker RSS", record.summary["worker_rss"]))
    print(f"wall time {record.wall_seconds:.1f} s for {record.count} predictions")
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(record.to_json(), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {arguments.json}")
    reasons = failures(record, arguments.max_growth)
    for reason in reasons:
        print(f"FAIL: {reason}", file=sys.stderr)
    if not reasons:
        print(f"PASS: worker RSS growth after warm-up is within {arguments.max_growth:g}%")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
