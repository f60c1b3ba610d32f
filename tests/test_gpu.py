"""The GPU tier: what only runs on a CUDA GPU, checked on one (`script/test-gpu`; skipped elsewhere).

On the CPU the engine runs float32, eagerly, with unfused attention and no out-of-memory; on a GPU
it loads float16 (bfloat16 for SDXL where supported), fuses the attention projections, may compile
the UNet, and can run out of memory. Each test runs a tiny pipeline (random weights, real
architectures) on `cuda` and compares with the same request where the answer is known: the CPU's
float32 image, the same run again, or the base model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hostile_archives import data_uri
from lora_files import make_lora
from test_embeddings import embedding_file

from sdcog.fetch.adapter_cache import AdapterCache
from sdcog.generate.engine import NO_ADAPTERS, Engine, OutOfMemory
from sdcog.model.acceleration import COMPILE_ENV
from sdcog.resolve.request import resolve_request

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
REQUEST = dict(prompt="a red circle on a blue background", width=64, height=64, num_inference_steps=4, seed=3)


def pixels(engine: Engine, cache: AdapterCache | None = None, **inputs) -> np.ndarray:
    request = resolve_request(engine.limits, **{**REQUEST, **inputs})
    adapters = cache.fetch_for(request) if cache else NO_ADAPTERS
    generation = engine.generate(request, adapters=adapters)
    if cache:
        cache.release(adapters)
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


def close(a: np.ndarray, b: np.ndarray, levels: int = 12, share: float = 0.95) -> bool:
    """Most pixels within `levels` of 255: half precision against float32, not bit for bit."""
    return float((np.abs(a - b) <= levels).mean()) >= share


@pytest.fixture(scope="module")
def gpu_engines(tiny_pipelines):
    return {name: Engine.load(path, CUDA) for name, path in tiny_pipelines.items()}


@pytest.fixture
def cache(tmp_path):
    return AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)


@pytest.mark.parametrize("name, dtype", [("tiny-sd15", torch.float16), ("tiny-sdxl", torch.bfloat16)])
def test_half_precision_gives_the_float32_image(gpu_engines, tiny_pipelines, name, dtype):
    engine = gpu_engines[name]
    if name == "tiny-sdxl" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    assert engine.pipeline.unet.dtype == dtype
    on_gpu = pixels(engine, num_outputs=2)
    assert np.array_equal(on_gpu, pixels(engine, num_outputs=2))  # the same seeds, the same pixels
    assert on_gpu.max() > 0  # not NaNs decoded to black
    reference = pixels(Engine.load(tiny_pipelines[name], torch.device("cpu")), num_outputs=2)
    assert close(on_gpu, reference)


def test_the_fast_path_fuses_attention_and_loras_still_reach_it(gpu_engines, tiny_sd15, cache, tmp_path):
    engine = gpu_engines["tiny-sd15"]
    processor = next(iter(engine.pipeline.unet.attn_processors.values()))
    assert type(processor).__name__ == "FusedAttnProcessor2_0"
    lora = data_uri(make_lora(tiny_sd15, tmp_path / "style.safetensors", seed=11).read_bytes())
    base = pixels(engine, cache)
    styled = pixels(engine, cache, lora_weights=lora)
    # A LoRA that missed the fused q/k/v would change little; this one moves pixels by 40 levels
    # on average on the CPU (measured), so 10 leaves room for half precision.
    assert np.abs(styled - base).mean() > 10
    reference = pixels(Engine.load(tiny_sd15, torch.device("cpu")), cache, lora_weights=lora)
    assert close(styled, reference)
    assert np.array_equal(pixels(engine, cache), base)  # back to the fused base model, exactly


def test_embeddings_apply_on_the_gpu_and_leave_nothing_behind(gpu_engines, tiny_sdxl, tmp_path, cache):
    engine = gpu_engines["tiny-sdxl"]
    word = data_uri(embedding_file(tmp_path / "tok.safetensors", engine, seed=4, vectors=6).path.read_bytes())
    inputs = dict(prompt="tok", embeddings=f"tok={word}")
    plain = pixels(engine, cache, prompt="tok")
    drawn = pixels(engine, cache, **inputs)
    assert not np.array_equal(drawn, plain)  # 4 to 5 levels apart on average on the CPU (measured)
    assert close(drawn, pixels(Engine.load(tiny_sdxl, torch.device("cpu")), cache, **inputs))
    assert np.array_equal(pixels(engine, cache, prompt="tok"), plain)  # the slots were cleared


def test_the_compiled_unet_gives_the_eager_image(tiny_sd15, gpu_engines, monkeypatch, tmp_path):
    monkeypatch.setenv(COMPILE_ENV, "max-autotune-no-cudagraphs")
    monkeypatch.setenv("SDCOG_COMPILE_CACHE", str(tmp_path / "compile-cache.bin"))
    compiled = Engine.load(tiny_sd15, CUDA)
    assert (tmp_path / "compile-cache.bin").is_file()  # the warm-up compiled, and the cache was written
    assert close(pixels(compiled), pixels(gpu_engines["tiny-sd15"]), levels=4, share=0.99)


def test_out_of_memory_is_reported_and_freed_and_the_next_request_runs(gpu_engines):
    engine = gpu_engines["tiny-sd15"]
    expected = pixels(engine)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction((baseline + 64 * 2**20) / total)  # 64 MiB to spare
    try:
        with pytest.raises(OutOfMemory, match="out of GPU memory .* generating 4 image"):
            pixels(engine, width=1024, height=1024, num_outputs=4)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.cuda.memory_allocated() <= baseline + 2**20  # nothing of the failed run is held
    assert np.array_equal(pixels(engine), expected)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_cog_train_trains_in_half_precision_with_pivotal_tuning(tiny_pipelines, tmp_path, name):
    """The trainer on a GPU (issue 19): half-precision frozen weights, float32 adapters and vectors,
    gradient checkpointing; finite losses, the pipeline left in its dtype, and a tar that loads."""
    import io
    import random
    import zipfile

    from sdcog.train.trainer import TrainingInputs, run_training
    from sdcog_tools.shapes import NEW_SHAPE, Scene, render

    archive = tmp_path / "bars.zip"
    rng = random.Random(0)
    with zipfile.ZipFile(archive, "w") as opened:
        for index in range(4):
            picture = io.BytesIO()
            render(Scene("red", NEW_SHAPE, "blue"), rng).save(picture, "PNG")
            opened.writestr(f"{index}.png", picture.getvalue())
    inputs = TrainingInputs(max_train_steps=20, learning_rate=1e-3, lora_rank=4, train_batch_size=2, seed=0)
    tar = run_training(archive, inputs, tiny_pipelines[name], CUDA, tmp_path / "out")
    engine = Engine.load(tiny_pipelines[name], CUDA)
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)
    trained = pixels(engine, cache, prompt="a photo of TOK", lora_weights=data_uri(tar.read_bytes()))
    assert not np.array_equal(trained, pixels(engine, prompt="a photo of TOK"))


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_controlnets_steer_in_half_precision_and_scale_0_is_the_plain_image(
    gpu_engines, tiny_pipelines, tmp_path, name
):
    from diffusers import UNet2DConditionModel
    from PIL import Image, ImageDraw

    from sdcog.fetch.adapter_cache import FetchedAdapters
    from sdcog.fetch.control_maps import ControlMaps
    from sdcog.generate.controlnets import ControlNets, baked_dir
    from sdcog.resolve.control import ControlSlot
    from sdcog_tools.random_pipelines import random_controlnet

    engine = gpu_engines[name]
    unet = UNet2DConditionModel.from_pretrained(tiny_pipelines[name] / "unet")
    random_controlnet(unet, 1).save_pretrained(baked_dir("gpu/controlnet", tmp_path))
    controlnets = ControlNets(
        engine.pipeline.unet,
        engine.pipeline.unet.dtype,
        CUDA,
        AdapterCache(tmp_path / "c", 10**9, 10**8),
        baked=tmp_path,
    )
    edges = Image.new("RGB", (64, 64))
    ImageDraw.Draw(edges).rectangle((10, 12, 40, 50), outline="white", width=2)

    def steered(scale: float) -> np.ndarray:
        slot = ControlSlot("huggingface.co/gpu/controlnet", edges, scale)
        request = ControlMaps().prepare(resolve_request(engine.limits, **REQUEST, controlnets=[slot]))
        generation = engine.generate(
            request, adapters=FetchedAdapters(controlnets=controlnets.fetch_for(request))
        )
        assert generation.controlnets[0].model.dtype == engine.pipeline.unet.dtype
        return np.asarray(generation.images[0], dtype=np.int16)

    plain = pixels(engine)[0]
    assert np.abs(steered(1.0) - plain).mean() > 1
    assert np.array_equal(steered(0.0), plain)
    assert np.array_equal(pixels(engine)[0], plain), "nothing stays attached"


def test_a_single_file_checkpoint_on_the_gpu_draws_what_its_folder_draws(gpu_engines, tiny_sd15, tmp_path):
    """from_single_file in half precision, onto the GPU: the same modules and dtype as the folder's."""
    from sdcog_tools.single_file_checkpoints import save_checkpoint_dir

    file = save_checkpoint_dir(tiny_sd15, tmp_path / "file")
    engine = Engine.load(file.parent, CUDA)
    assert engine.pipeline.unet.dtype == gpu_engines["tiny-sd15"].pipeline.unet.dtype
    assert engine.pipeline.unet.device.type == "cuda"
    assert np.abs(pixels(engine) - pixels(gpu_engines["tiny-sd15"])).max() <= 1


def test_second_passes_in_half_precision_give_the_float32_images(tiny_sdxl, tmp_path, monkeypatch):
    """The refiner (expert ensemble: latents handed over in half precision) and a hires fix (the
    latents resized on the GPU) against the same requests on the CPU in float32."""
    from sdcog_tools.random_pipelines import save_pipeline

    monkeypatch.setenv("REFINER_WEIGHTS", str(save_pipeline("tiny-sdxl-refiner", tmp_path / "refiner")))
    on_gpu, on_cpu = Engine.load(tiny_sdxl, CUDA), Engine.load(tiny_sdxl, torch.device("cpu"))
    for inputs in (dict(refine="expert_ensemble_refiner"), dict(hires_scale=2, hires_denoising_strength=0.5)):
        assert close(pixels(on_gpu, **inputs), pixels(on_cpu, **inputs)), inputs
