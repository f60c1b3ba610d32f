"""The GPU fast path's choices, and its numerics checked on the CPU (its speed needs a GPU)."""

import numpy as np
import pytest
import torch

from sdcog.generate.engine import Engine
from sdcog.model import acceleration
from sdcog.model.acceleration import COMPILE_ENV, compile_mode, decode_bytes, optimize_modules, pipeline_dtype
from sdcog.model.families import SD1, SD2, SDXL
from sdcog.resolve.request import resolve_request

CUDA = torch.device("cuda")


def test_precision_per_family(monkeypatch):
    assert {pipeline_dtype(family, torch.device("cpu")) for family in (SD1, SD2, SDXL)} == {torch.float32}
    monkeypatch.setattr(acceleration, "bf16_supported", lambda device: True)
    assert [pipeline_dtype(family, CUDA) for family in (SD1, SD2, SDXL)] == [
        torch.float16,
        torch.float16,
        torch.bfloat16,  # SDXL's VAE overflows in float16; bfloat16 has float32's range
    ]
    monkeypatch.setattr(acceleration, "bf16_supported", lambda device: False)
    assert pipeline_dtype(SDXL, CUDA) == torch.float16  # pre-Ampere: float16, VAE upcast by diffusers


@pytest.mark.parametrize("pipeline_fixture", ["tiny_sd15", "tiny_sdxl"])
def test_fused_qkv_draws_the_same_images(request, pipeline_fixture):
    engine = Engine.load(request.getfixturevalue(pipeline_fixture))
    arguments = dict(prompt="a red circle", width=64, height=64, num_inference_steps=3, seed=4, num_outputs=2)
    before = [
        np.asarray(image, dtype=np.int16)
        for image in engine.generate(resolve_request(engine.limits, **arguments)).images
    ]
    applied = optimize_modules(engine.pipeline)
    assert applied == ["unet: fused QKV", "vae: fused QKV"]
    after = [
        np.asarray(image, dtype=np.int16)
        for image in engine.generate(resolve_request(engine.limits, **arguments)).images
    ]
    for old, new in zip(before, after, strict=True):
        assert np.abs(old - new).max() <= 2  # float rounding of a different summation order


def test_a_decode_is_tiled_when_it_would_not_fit_in_memory_and_never_for_its_size_alone(
    tiny_sd15, monkeypatch
):
    """Issue 18: tiling followed the VAE config's sample size, so a VAE trained at 64 px decoded a
    256x256 image in tiles, 5x slower than whole, with all the memory it needed at hand."""
    engine = Engine.load(tiny_sd15)
    vae = engine.pipeline.vae
    tile = vae.tile_sample_min_size  # 128 for the tiny VAE (512 for SD 1.5's)
    large = resolve_request(engine.limits, prompt="a", width=2 * tile + 8, height=64, num_inference_steps=1)
    engine.generate(large)
    assert not vae.use_tiling  # over twice the tile size, but a few MB to decode
    needed = decode_bytes(vae, large.width, large.height, 1)
    monkeypatch.setattr("sdcog.generate.engine.free_memory_bytes", lambda device: needed)  # half of it free
    [image] = engine.generate(large).images
    assert vae.use_tiling and image.size == (2 * tile + 8, 64)
    monkeypatch.setattr("sdcog.generate.engine.free_memory_bytes", lambda device: 2 * needed)
    engine.generate(large)
    assert not vae.use_tiling  # set per request: the next one does not inherit it


def test_compile_mode_from_the_environment():
    assert [compile_mode({COMPILE_ENV: value}) for value in ("", "0", "false", "no")] == [None] * 4
    assert compile_mode({}) is None
    assert compile_mode({COMPILE_ENV: "1"}) == compile_mode({COMPILE_ENV: "yes"}) == "reduce-overhead"
    assert compile_mode({COMPILE_ENV: " Max-Autotune "}) == "max-autotune"
    with pytest.raises(ValueError, match=f"{COMPILE_ENV}='fast': use 1 or one of reduce-overhead, "):
        compile_mode({COMPILE_ENV: "fast"})


def test_the_compiled_warm_up_runs_on_the_thread_that_runs_predictions(tiny_sd15, monkeypatch, tmp_path):
    """CUDA graphs recorded by a compiled UNet belong to the thread that recorded them."""
    import threading

    import sdcog.generate.engine
    from sdcog.generate.cancellation import on_generation_thread

    compiled, threads = [], []
    monkeypatch.setenv(COMPILE_ENV, "reduce-overhead")
    monkeypatch.setenv("SDCOG_COMPILE_CACHE", str(tmp_path / "cache.bin"))
    monkeypatch.setattr(
        sdcog.generate.engine, "compile_unet", lambda pipeline, cache, mode: compiled.append(mode)
    )
    monkeypatch.setattr(sdcog.generate.engine, "save_compile_cache", lambda cache: None)
    generate = Engine.generate
    monkeypatch.setattr(
        Engine, "generate", lambda *args: (threads.append(threading.get_ident()), generate(*args))[1]
    )
    engine = Engine.load(tiny_sd15)
    assert compiled == ["reduce-overhead"] and len(threads) == 1
    request = resolve_request(engine.limits, prompt="a", width=64, height=64, num_inference_steps=1)
    on_generation_thread(lambda: engine.generate(request))
    assert threads[1] == threads[0] != threading.get_ident()
