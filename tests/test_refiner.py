"""The SDXL refiner on the tiny SDXL with a tiny refiner: each mode runs, the refiner shares the
base's VAE and second text encoder (no second copy), it works with a LoRA on the base, and
`refine` is refused when no refiner is loaded or the base is not SDXL."""

import base64

import numpy as np
import pytest
from lora_files import make_lora

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterCache
from sdcog.generate.engine import Engine
from sdcog.model.weights import WeightsError
from sdcog.resolve.request import resolve_request
from sdcog_tools.random_pipelines import save_pipeline

MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    return save_pipeline("tiny-sdxl-refiner", tmp_path_factory.mktemp("refiner") / "refiner")


def load(path, refiner=None):
    with pytest.MonkeyPatch.context() as patch:
        if refiner is not None:
            patch.setenv("REFINER_WEIGHTS", str(refiner))
        return Engine.load(path)


@pytest.fixture(scope="module")
def engine(tiny_sdxl, refiner_dir):
    return load(tiny_sdxl, refiner_dir)


def image(engine, adapters=None, **inputs):
    request = resolve_request(
        engine.limits, prompt="a red circle", width=64, height=64, seed=3, num_inference_steps=10, **inputs
    )
    generation = engine.generate(request, adapters=adapters) if adapters else engine.generate(request)
    return np.asarray(generation.images[0], dtype=np.int16)


def test_the_refiner_shares_the_bases_vae_and_second_text_encoder(engine, refiner_dir):
    refiner = engine.refiner.pipeline
    assert refiner.vae is engine.pipeline.vae and refiner.text_encoder_2 is engine.pipeline.text_encoder_2
    assert refiner.tokenizer_2 is engine.pipeline.tokenizer_2 and refiner.text_encoder is None
    shared = {id(parameter) for parameter in engine.pipeline.components["vae"].parameters()}
    assert shared <= {id(parameter) for parameter in refiner.vae.parameters()}
    assert refiner.unet is not engine.pipeline.unet and refiner.unet.config.cross_attention_dim == 32


def test_each_refine_mode_runs_the_refiners_unet_and_changes_the_image(engine, caplog):
    calls = []
    hooks = [
        engine.refiner.pipeline.unet.register_forward_hook(lambda *_: calls.append("refiner")),
        engine.pipeline.unet.register_forward_hook(lambda *_: calls.append("base")),
    ]
    try:
        images, steps = {}, {}
        for mode in MODES:
            calls.clear()
            images[mode] = image(engine, refine=mode)
            steps[mode] = (calls.count("base"), calls.count("refiner"))
    finally:
        for hook in hooks:
            hook.remove()
    # 10 steps: the expert ensemble shares them (DPM++ 2M Karras puts 4 of its timesteps under the
    # 0.8 switch); base_image_refiner repaints the finished image in int(10 x 0.3) = 3.
    assert steps == {"no_refiner": (10, 0), "expert_ensemble_refiner": (6, 4), "base_image_refiner": (10, 3)}
    base = images["no_refiner"]
    for mode in MODES[1:]:
        assert images[mode].shape == base.shape == (64, 64, 3)
        assert not np.array_equal(images[mode], base), mode
    assert np.array_equal(image(engine, refine="no_refiner"), base)  # no refiner: as before
    # Progress over both passes: 10 steps of which the refiner runs the last 2 (0.8 switch).
    with caplog.at_level("INFO", logger="sdcog.generate.progress"):
        image(engine, refine="expert_ensemble_refiner")
    lines = [record.getMessage() for record in caplog.records if "|" in record.getMessage()]
    assert lines[-1].lstrip().startswith("100%") and "| 10/10 " in lines[-1], lines[-1]


def test_refining_works_with_a_lora_on_the_base(engine, tiny_sdxl, tmp_path):
    lora = make_lora(tiny_sdxl, tmp_path / "lora.safetensors", seed=2, kohya=True)
    cache = AdapterCache(tmp_path / "cache", 10**9, 10**8)
    request = resolve_request(
        engine.limits,
        prompt="a red circle",
        width=64,
        height=64,
        seed=3,
        num_inference_steps=10,
        refine="base_image_refiner",
        lora_weights="data:application/octet-stream;base64," + base64.b64encode(lora.read_bytes()).decode(),
    )
    adapters = cache.fetch_for(request)
    with_lora = np.asarray(engine.generate(request, adapters=adapters).images[0], dtype=np.int16)
    cache.release(adapters)
    assert np.abs(with_lora - image(engine, refine="base_image_refiner")).mean() > 1


def test_refine_is_refused_naming_it_without_a_refiner_or_on_another_family(
    tiny_sdxl, tiny_sd15, refiner_dir
):
    for engine, reason in (
        (load(tiny_sdxl), "no refiner is loaded"),
        (load(tiny_sd15, refiner_dir), "for SDXL"),
    ):
        with pytest.raises(InputError, match=reason) as refused:
            resolve_request(engine.limits, prompt="x", refine="base_image_refiner")
        assert refused.value.field == "refine"
    with pytest.raises(InputError) as refused:
        resolve_request(engine_limits := load(tiny_sdxl).limits, prompt="x", refine="sideways")
    assert refused.value.field == "refine" and engine_limits.refiner_missing


def test_a_refiner_for_another_base_is_refused_at_setup(tmp_path, refiner_dir):
    wider = save_pipeline("tiny-sdxl-distinct-encoders", tmp_path / "wider")
    with pytest.raises(WeightsError, match="not a refiner for this base"):
        load(wider, refiner_dir)


def test_refine_inputs_are_checked(engine):
    for inputs, field in (
        (dict(refine="expert_ensemble_refiner", high_noise_frac=1.0), "high_noise_frac"),
        (dict(refine="expert_ensemble_refiner", refine_steps=5), "refine_steps"),
        (dict(refine="base_image_refiner", refine_steps=2), "refine_steps"),
        (dict(refine="base_image_refiner", hires_scale=2), "refine"),
    ):
        with pytest.raises(InputError) as refused:
            resolve_request(engine.limits, prompt="x", width=64, height=64, **inputs)
        assert refused.value.field == field, inputs


def test_download_weights_bakes_only_the_refiners_unet_which_then_loads(
    tiny_sdxl, refiner_dir, tmp_path, monkeypatch
):
    from hub_server import HubServer

    from sdcog_tools.download import REFINER_REPOSITORY, bake_refiner

    with HubServer() as hub:
        hub.add_repo_from_dir(REFINER_REPOSITORY, refiner_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("SDCOG_ALLOW_LOCAL_URLS", "1")  # the test hub is on 127.0.0.1
        baked = bake_refiner(tmp_path / "refiner")
        fetched = {request.path.split("/resolve/main/")[-1] for request in hub.requests_to("", "GET")}
    assert sorted(path.relative_to(baked).as_posix() for path in baked.rglob("*") if path.is_file()) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert not any(
        name.startswith(("vae/", "text_encoder_2/")) and name.endswith(".safetensors") for name in fetched
    )
    assert load(tiny_sdxl, baked).refiner is not None


@pytest.mark.parametrize("second_pass", [dict(refine="expert_ensemble_refiner"), dict(hires_scale=2)])
def test_a_batch_of_second_passes_gives_each_request_its_lone_pixels(engine, second_pass):
    """Several clients at once: requests with the same second pass run as one batch, each with its
    own prompt and seeds in both passes, and each gets what it would alone (to rounding)."""
    from sdcog.generate.batching import Batcher

    requests = [
        resolve_request(
            engine.limits, prompt=prompt, width=64, height=64, seed=seed, num_inference_steps=8, **second_pass
        )
        for prompt, seed in (("a red circle", 3), ("a blue square", 9))
    ]
    jobs = Batcher(engine, batching=True).submit_all([(request, None) for request in requests])
    batched = [np.asarray(job.future.result().images[0], dtype=np.int16) for job in jobs]
    assert [job.batch_size for job in jobs] == [2, 2]
    for request, together in zip(requests, batched, strict=True):
        alone = np.asarray(engine.generate(request).images[0], dtype=np.int16)
        assert np.abs(together - alone).max() <= 2
    assert np.abs(batched[0] - batched[1]).mean() > 1
