"""`script/bench`: the project's prediction path against plain diffusers, on the same weights.

Four paths make the same images (prompt, size, steps, guidance, batch, seed), each after one
untimed warm-up, interleaved (every repetition reverses the previous one's order), medians reported:
- plain: `DiffusionPipeline.from_pretrained(dir, dtype, local_files_only, use_safetensors).to()` and
  one call with default settings (the model's own scheduler: the project runs the same one);
- project: `resolve_request` + `Engine.generate` + `write_outputs` (webp, quality 90), in-process;
- predict: predict.py's `Predictor().predict(...)`, in-process, with its own loaded model;
- http: POST /predictions to Cog's real server (`sdcog_tools.cog_server`), end to end.
Step-end timestamps (plain's callback_on_step_end; the engine's StepProgress.step) split a run into
before the first step (text encoding, setup), the steps, and after the last (VAE decode, safety
checker, PIL conversion, encoding and writing files). Setup is timed in fresh interpreters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import inspect
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import diffusers
import httpx
import psutil
import torch
from PIL import Image, ImageDraw

from sdcog.generate.cancellation import on_generation_thread
from sdcog.generate.engine import Engine
from sdcog.generate.generation import Generation
from sdcog.generate.progress import StepProgress
from sdcog.heap import HeapTrimmer
from sdcog.model.acceleration import COMPILE_ENV, COMPILE_MODES, compile_mode
from sdcog.model.families import SDXL, detect_family
from sdcog.model.weights import PROJECT_ROOT, WEIGHTS_ENV
from sdcog.resolve.request import resolve_request
from sdcog.resolve.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdcog.write.outputs import write_outputs
from sdcog_tools.bench_concurrency import format_concurrency, run_concurrency
from sdcog_tools.bench_report import (
    HTTP,
    PLAIN,
    PREDICT,
    PROJECT,
    format_matrix,
    format_report,
    plot,
    ratio,
    targets,
)
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server
from sdcog_tools.random_pipelines import PRESETS, save_pipeline

MIB = 2**20
PROMPT = "a red circle on a blue background"
REAL_SIZE = {"sd15-real-arch": (512, 512, 25), "sdxl-real-arch": (1024, 1024, 30)}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one extra run, minus memory_allocated before it",
    "cpu": "peak RSS (psutil, every 2 ms) during one extra run, minus RSS before it (after malloc_trim)",
}
# One cold boot in a fresh interpreter: import + load (the CUDA context, the same for both, not counted).
BOOT = """
import json, resource, sys, time
started = time.perf_counter()
path, directory, device, variant = sys.argv[1:5]
import torch
if path == "project":
    from pathlib import Path
    from sdcog.generate.engine import Engine
    load = lambda: Engine.load(Path(directory), torch.device(device))
else:
    from diffusers import DiffusionPipeline
    load = lambda: DiffusionPipeline.from_pretrained(directory, local_files_only=True, use_safetensors=True,
        dtype=torch.float16 if device == "cuda" else torch.float32, variant=variant or None).to(device)
imported = time.perf_counter()
if device == "cuda":
    torch.zeros(1, device=device); torch.cuda.synchronize()
ready = time.perf_counter()
pipeline = load()
torch.cuda.synchronize() if device == "cuda" else None
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - ready,
    "boot_s": imported - started + loaded - ready,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "gpu_mib": torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None}))
"""


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def phases(start: float, end: float, stamps: list[float]) -> dict[str, Any]:
    """One run's figures from its start, end and step-end timestamps (before: until step 1 began)."""
    run: dict[str, Any] = {"total_s": end - start, "steps": len(stamps)}
    if len(stamps) >= 2:
        step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        before, after = stamps[0] - step - start, end - stamps[-1]
        run.update(
            step_s=step, before_s=before, after_s=after, outside_share=(before + after) / (end - start)
        )
    return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("total_s", "steps", "step_s", "before_s", "after_s", "outside_share")
    summary = {key: median(run.get(key) for run in runs) for key in keys}
    return {**summary, "fastest_s": min(run["total_s"] for run in runs)}


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, IndexError):
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line)
        cpu = cpu.split(":", 1)[1].strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def prepare_weights(preset: str | None, weights: Path | None) -> tuple[str, Path]:
    """(name, directory): `weights` as given, or the preset built once into .cache/bench/<preset>."""
    if weights is not None:
        return weights.resolve().name, weights.resolve()
    directory = PROJECT_ROOT / ".cache" / "bench" / preset
    if not (directory / "model_index.json").is_file():
        print(f"bench: building the {preset} pipeline (random weights) into {directory}", flush=True)
        save_pipeline(preset, directory, dtype=torch.float16 if preset in REAL_SIZE else torch.float32)
    return preset, directory


class StepClock:
    """Step-end times of the run in progress: plain's callback, the engine's StepProgress.step.

    On a GPU each mark records a CUDA event instead of waiting for the GPU, so timing does not
    add a host-device sync per step (which would hide how well launches overlap the GPU's work);
    the events are read once the run has finished."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[float] = []
        self.events: list[Any] = []
        self.origin: Any = None
        self.began = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> float:
        """Wait for the GPU, then start a run's clock; returns the host time it started."""
        self.sync()
        self.stamps, self.events = [], []
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        self.began = time.perf_counter()
        return self.began

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def finish(self) -> tuple[float, list[float]]:
        """Wait for the GPU; returns the host time the run ended and its step-end times."""
        self.sync()
        ended = time.perf_counter()
        if self.cuda:
            self.stamps = [self.began + self.origin.elapsed_time(event) / 1000 for event in self.events]
        return ended, self.stamps

    def callback(self, _pipeline, _step, _timestep, callback_kwargs):
        self.mark()
        return callback_kwargs

    @contextlib.contextmanager
    def patch_engine(self) -> Iterator[None]:
        original = StepProgress.step
        StepProgress.step = lambda progress: (self.mark(), original(progress))[1]
        try:
            yield
        finally:
            StepProgress.step = original


@contextlib.contextmanager
def torch_defaults(device: torch.device) -> Iterator[None]:
    """PyTorch's default TF32 settings for the plain runs (the engine turns TF32 on process-wide)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_memory_mib(run: Callable[[], None], device: torch.device) -> float:
    """What one run needs above what was in use before it (see MEMORY_METHOD)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    gc.collect()
    HeapTrimmer(min_free_bytes=0).trim()
    process, done = psutil.Process(), threading.Event()
    base = peak = process.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return (max(peak, process.memory_info().rss) - base) / MIB


def fp16_variant(directory: Path) -> str:
    return "fp16" if any(directory.glob("*/*.fp16.safetensors")) else ""


def measure_setup(directory: Path, device: torch.device, reps: int) -> dict[str, Any]:
    """Cold boot (import + load) in a fresh interpreter per run, plain and project alternating."""
    runs: dict[str, list[dict[str, Any]]] = {PLAIN: [], PROJECT: []}
    for rep in range(reps):
        for path in (PLAIN, PROJECT) if rep % 2 == 0 else (PROJECT, PLAIN):
            command = [sys.executable, "-c", BOOT, path, str(directory), device.type, fp16_variant(directory)]
            done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{path} setup failed:\n{done.stderr[-2000:]}")
            runs[path].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("import_s", "load_s", "boot_s", "peak_rss_mib", "gpu_mib")
    setup = {path: {key: median(run[key] for run in runs[path]) for key in keys} for path in runs}
    return {**setup, "runs": runs, "method": f"fresh interpreter per run, {reps} each, alternating"}


def sample_picture(size: int, index: int) -> Image.Image:
    """A photo-like synthetic picture: colour gradients, a few shapes and mild noise."""
    red = Image.linear_gradient("L").resize((size, size))
    green = Image.radial_gradient("L").resize((size, size))
    image = Image.merge("RGB", (red, green, red.rotate(90 + 45 * index)))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        left, top = size * k // 8, size * ((k + index) % 5) // 6
        draw.ellipse((left, top, left + size * 3 // 8, top + size // 3), fill=(40 * k, 255 - 30 * k, 90))
    return Image.blend(image, Image.merge("RGB", [Image.effect_noise((size, size), 40)] * 3), 0.12)


def measure_encoding(engine: Engine, reps: int, directory: Path) -> dict[str, Any]:
    """write_outputs (save_image per image) of four 1024x1024 images as webp, quality 90; 1 warm-up."""
    request = resolve_request(engine.limits, prompt=PROMPT, width=1024, height=1024, num_outputs=4, seed=1)
    images, times = [sample_picture(1024, index) for index in range(4)], []
    for _ in range(max(reps, 3) + 1):
        started = time.perf_counter()
        paths = write_outputs(Generation(images), request, engine.weights.name, directory)
        times.append(1000 * (time.perf_counter() - started))
    return {
        "ms": median(times[1:]),
        "runs_ms": [round(ms, 2) for ms in times[1:]],
        "format": f"{request.output_format} quality {request.output_quality}",
        "kb_per_image": sum(path.stat().st_size for path in paths) / 4000,
    }


def load_predictor(directory: Path, device: torch.device) -> Any:
    """predict.py's Predictor after its setup() on `directory` and `device`; our logging kept."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    import predict
    import sdcog.generate.engine

    saved = os.environ.get(WEIGHTS_ENV), logging.root.handlers[:], sdcog.generate.engine.default_device
    os.environ[WEIGHTS_ENV], sdcog.generate.engine.default_device = str(directory), lambda: device
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # setup() logs to stdout
            predictor = predict.Predictor()
            predictor.setup()
    finally:
        os.environ.pop(WEIGHTS_ENV) if saved[0] is None else os.environ.update({WEIGHTS_ENV: saved[0]})
        sdcog.generate.engine.default_device = saved[2]
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=saved[1], force=True)
    return predictor


def default_inputs(predictor: Any) -> dict[str, Any]:
    """predict()'s declared defaults (a direct call gets Cog's FieldInfo objects otherwise)."""
    parameters = inspect.signature(predictor.predict).parameters.items()
    return {name: getattr(parameter.default, "default", parameter.default) for name, parameter in parameters}


def settle(server: Any) -> None:
    """Between runs: let predict()'s background heap trim finish, and the server free its slot."""
    for thread in threading.enumerate():
        if thread.name == "heap-trim":
            thread.join()
    if server is not None:
        server.settled_status()


def start_server(stack: contextlib.ExitStack, directory: Path, device: torch.device) -> tuple[Any, float]:
    """Cog's HTTP server on `directory` (on the CPU when `device` is), as script/serve runs it."""
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {WEIGHTS_ENV: str(directory), **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
    started = time.perf_counter()
    server = stack.enter_context(running_server(PROJECT_ROOT, env=env))
    return server, time.perf_counter() - started


def post_prediction(client: httpx.Client, inputs: dict[str, Any]) -> None:
    answer = client.post("/predictions", json={"input": inputs}).json()
    if answer.get("status") != "succeeded" or len(answer.get("output") or []) != inputs["num_outputs"]:
        raise RuntimeError(f"the HTTP prediction ended {answer.get('status')}: {answer.get('error')}")


def time_paths(
    paths: dict[str, Callable[[], Any]], reps: int, clock: StepClock, server: Any
) -> dict[str, list]:
    """Each path `reps` times after one untimed warm-up, interleaved; each rep reverses the order."""
    runs: dict[str, list] = {path: [] for path in paths}
    for rep in range(-1, reps):
        for path in list(paths) if rep % 2 else list(paths)[::-1]:
            settle(server)
            gc.collect()
            begin = clock.start()
            paths[path]()
            end, stamps = clock.finish()
            if rep >= 0:
                runs[path].append(phases(begin, end, stamps if path != HTTP else []))
    return runs


def load_both(directory: Path, device: torch.device, sync: Callable[[], None]) -> tuple[Any, Engine, dict]:
    """The plain pipeline, then the project's engine, on `device`; each load timed in-process."""
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        plain = diffusers.DiffusionPipeline.from_pretrained(
            directory,
            dtype=torch.float16 if device.type == "cuda" else torch.float32,
            local_files_only=True,
            use_safetensors=True,
            variant=fp16_variant(directory) or None,
            # SDXL pipelines add their own watermark when invisible-watermark is installed; the
            # project's engine does not (it is added when files are written): compare like for like.
            **({"add_watermarker": False} if detect_family(directory) is SDXL else {}),
        ).to(device)
    sync()
    loaded = time.perf_counter()
    engine = Engine.load(directory, device)
    sync()
    loads = {PLAIN: {"load_s": loaded - started}, PROJECT: {"load_s": time.perf_counter() - loaded}}
    return plain, engine, loads


def common_scheduler(plain: Any) -> str:
    """The project's name for the model's own scheduler, so both paths run the same steps; where it
    has none, the project's default, which the plain pipeline then gets too."""
    own, config = type(plain.scheduler).__name__, plain.scheduler.config
    same = (
        name
        for name, spec in SCHEDULERS.items()
        if spec.class_name == own and all(config.get(key) == value for key, value in spec.overrides.items())
    )
    scheduler = next(same, DEFAULT_SCHEDULER)
    if SCHEDULERS[scheduler].class_name != own:
        plain.scheduler = SCHEDULERS[scheduler].build(plain.scheduler.config)
    return scheduler


def plain_path(
    plain: Any, inputs: dict[str, Any], device: torch.device, clock: StepClock
) -> Callable[[], Any]:
    """One plain diffusers call, default settings, with the same images asked for."""
    call = functools.partial(
        plain,
        prompt=inputs["prompt"],
        num_inference_steps=inputs["num_inference_steps"],
        guidance_scale=inputs["guidance_scale"],
        width=inputs["width"],
        height=inputs["height"],
        num_images_per_prompt=inputs["num_outputs"],
        output_type="pil",
        callback_on_step_end=clock.callback,
    )

    def run() -> None:
        with torch_defaults(device), contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            call(generator=torch.Generator(device).manual_seed(inputs["seed"]))

    return run


def project_path(
    engine: Engine, inputs: dict[str, Any], directory: Path, encode_times: list[float]
) -> Callable[[], Any]:
    """What a prediction does in-process: resolve the request, generate, write the files (how long
    writing took goes to `encode_times`, so that the time after the last step splits into the
    VAE decode and the encoding)."""

    def run() -> None:
        request = resolve_request(engine.limits, **inputs)
        # On the thread where predict() generates (CUDA graphs of a compiled UNet belong to it).
        generation = on_generation_thread(lambda: engine.generate(request))
        started = time.perf_counter()
        write_outputs(generation, request, engine.weights.name, directory)
        encode_times.append(time.perf_counter() - started)

    return run


def run_bench(
    directory: Path,
    device: torch.device,
    width: int | None = None,
    height: int | None = None,
    steps: int = 10,
    num_outputs: int = 1,
    reps: int = 15,
    http: bool = True,
    setup_reps: int = 2,
    predict: bool = True,
) -> dict[str, Any]:
    """Every figure of the benchmark, as a JSON-ready record (setup_reps=0: setup timed in-process;
    predict=False: neither the in-process predict() nor HTTP, which would load another model)."""
    started, load_start = time.perf_counter(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="sdcog-bench-"))
    with logging_to(workdir / "bench.log"):
        clock = StepClock(device)
        plain, engine, loads = load_both(directory, device, clock.sync)
        inputs = dict(prompt=PROMPT, width=width, height=height, num_outputs=num_outputs, seed=1)
        inputs.update(num_inference_steps=steps, scheduler=common_scheduler(plain), output_format="webp")
        request = resolve_request(engine.limits, **inputs, output_quality=90)
        inputs.update(width=request.width, height=request.height, guidance_scale=request.guidance_scale)
        inputs["output_quality"] = request.output_quality
        encode_times: list[float] = []
        paths = {
            PLAIN: plain_path(plain, inputs, device, clock),
            PROJECT: project_path(engine, inputs, workdir / "project", encode_times),
        }
        if predict:
            predictor = load_predictor(directory, device)
            arguments = {**default_inputs(predictor), **inputs}
            paths[PREDICT] = lambda: asyncio.run(predictor.predict(**arguments))
        with contextlib.ExitStack() as stack:
            stack.enter_context(clock.patch_engine())
            server = http_ready_s = None
            if http and predict:
                server, http_ready_s = start_server(stack, directory, device)
                client = stack.enter_context(httpx.Client(base_url=server.url, timeout=600))
                paths[HTTP] = functools.partial(post_prediction, client, inputs)
            runs = time_paths(paths, reps, clock, server)
            settle(server)
            memory = {path: peak_memory_mib(paths[path], device) for path in (PLAIN, PROJECT)}
        encoding = measure_encoding(engine, reps, workdir / "encoding")
        dtypes = {PLAIN: str(plain.dtype), PROJECT: str(engine.pipeline.dtype)}
        plain = engine = predictor = paths = None  # free the models before the setup runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if setup_reps > 0:
            setup = measure_setup(directory, device, setup_reps)
        else:
            setup = {**loads, "method": "in-process load, once each, plain first (imports not counted)"}
    latency = {path: summarize(path_runs) for path, path_runs in runs.items()}
    # The project's time after the last step: the VAE decode (and safety checker), then encoding.
    encode_s = median(encode_times[1 : 1 + reps])  # the timed reps (the first was the warm-up)
    if encode_s is not None and latency[PROJECT].get("after_s") is not None:
        latency[PROJECT].update(encode_s=encode_s, decode_s=latency[PROJECT]["after_s"] - encode_s)
    setup_key = "boot_s" if setup_reps > 0 else "load_s"
    plain_s, predict_s, http_s = (latency.get(path, {}).get("total_s") for path in (PLAIN, PREDICT, HTTP))
    return {
        "machine": machine_info(device),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "settings": {
            **inputs,
            "reps": reps,
            "device": str(device),
            "weights": str(directory),
            "dtype": dtypes,
            "compile": compile_mode(),
        },
        "setup": setup,
        "http_ready_s": http_ready_s,
        "latency": latency,
        "runs": runs,
        "memory_mib": {**memory, "method": MEMORY_METHOD[device.type]},
        "encoding": encoding,
        "ratios": {
            "setup": ratio(setup[PROJECT][setup_key], setup[PLAIN][setup_key]),
            "latency": ratio(latency[PROJECT]["total_s"], plain_s),
            "step": ratio(latency[PROJECT]["step_s"], latency[PLAIN]["step_s"]),
            "predict": ratio(predict_s, plain_s),
            "memory": ratio(memory[PROJECT], memory[PLAIN]),
            "http_minus_predict_ms": None if http_s is None else 1000 * (http_s - predict_s),
            "http_minus_plain_ms": None if http_s is None else 1000 * (http_s - plain_s),
        },
        "wall_s": time.perf_counter() - started,
    }


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The project logs at INFO, as in a prediction, into `path`; the caller's logging is restored."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.basicConfig(level=logging.INFO, format="%(message)s", filename=path, force=True)
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="script/bench", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help="random-weight pipeline (default tiny-sd15)"
    )
    source.add_argument(
        "--weights", type=Path, help="any diffusers pipeline directory, e.g. models/shapes-sd"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    parser.add_argument("--width", type=int, help="default: native (real-arch presets: 512 / 1024)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, help="default: 10 on the CPU, 30 on a GPU (sd15-real-arch 25)")
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument(
        "--reps",
        type=int,
        help="timed runs per path (default 15; real-arch presets: 10 on a GPU, 2 on the CPU)",
    )
    parser.add_argument(
        "--setup-reps",
        type=int,
        help="fresh interpreters per path (0: in-process; default 2, with --compile 0)",
    )
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP server")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="the project's UNet compiled in this torch.compile mode (SDCOG_COMPILE) and warmed "
        "up at load; setup is then timed in-process, and predict() and HTTP are skipped",
    )
    parser.add_argument(
        "--sizes",
        help="a matrix of square sizes, e.g. 64,256,512: each measured as above, then one table "
        "of them all (the JSON holds each size's record)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="instead of the paths: images per second with N clients at once against one, through "
        "the HTTP server (batching on and off); --reps requests per run (default 8 x N)",
    )
    parser.add_argument("--json", type=Path, help="default: bench/bench-<name>-<device>.json")
    parser.add_argument("--plot", type=Path, help="default: the --json path with .png")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (or torch was built without CUDA)")
    preset = args.preset or (None if args.weights else "tiny-sd15")
    name, directory = prepare_weights(preset, args.weights)
    width, height, steps = REAL_SIZE.get(preset, (None, None, 30 if device.type == "cuda" else 10))
    real_size = preset in REAL_SIZE
    reps = args.reps or (15 if not real_size else 10 if device.type == "cuda" else 2)
    if args.compile:
        os.environ[COMPILE_ENV] = args.compile
    print(f"bench: {name} ({directory}) on {device}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.concurrency:
        inputs = dict(prompt=PROMPT, num_inference_steps=args.steps or steps, num_outputs=args.num_outputs)
        inputs.update(width=args.width or width or 512, height=args.height or height or 512)
        record = run_concurrency(
            directory, device, inputs, args.concurrency, args.reps or 8 * args.concurrency
        )
        print(format_concurrency(record))
        json_path = args.json or PROJECT_ROOT / "bench" / f"concurrency-{name}-{device.type}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
        return 0
    if args.sizes:
        records = {}
        for size in [int(value) for value in args.sizes.split(",")]:
            records[size] = run_bench(
                directory,
                device,
                width=size,
                height=size,
                steps=args.steps or steps,
                num_outputs=args.num_outputs,
                reps=reps,
                http=not args.no_http,
                setup_reps=0,
                predict=not args.compile,
            )
            records[size]["name"] = name
            records[size]["targets"] = targets(records[size])
            print(format_report(records[size]), flush=True)
        print(format_matrix(records))
        json_path = args.json or PROJECT_ROOT / "bench" / f"bench-{name}-{device.type}-matrix.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({str(size): r for size, r in records.items()}, indent=1) + "\n")
        print(f"wrote {json_path}")
        return (
            1 if args.strict and any(t["ok"] is False for r in records.values() for t in r["targets"]) else 0
        )
    record = run_bench(
        directory,
        device,
        width=args.width or width,
        height=args.height or height,
        steps=args.steps or steps,
        num_outputs=args.num_outputs,
        reps=reps,
        http=not args.no_http,
        setup_reps=args.setup_reps if args.setup_reps is not None else 0 if args.compile else 2,
        predict=not args.compile,
    )
    record["name"] = name  # before the targets, which depend on it
    record["targets"] = targets(record)
    print(format_report(record))
    json_path = args.json or PROJECT_ROOT / "bench" / f"bench-{name}-{device.type}.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    plot(record, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 1 if args.strict and any(target["ok"] is False for target in record["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
