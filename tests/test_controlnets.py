"""ControlNets through the Python API on the tiny pipelines: every mode on SD 1.5 and SDXL, several
at once, fetched once and kept, refused naming the field when they do not fit, and no trace left on
the plain pipeline. (The bundled ControlNet's oracle: tests/test_controlnet_oracle.py; the HTTP
contract: tests/test_controlnet_http.py.)"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from lora_files import StaticServer, make_lora
from PIL import Image, ImageDraw

from sdcog.errors import InputError
from sdcog.fetch.adapter_cache import AdapterCache, FetchedAdapters
from sdcog.fetch.control_maps import ControlMaps, canny_edges
from sdcog.generate.batching import Batcher
from sdcog.generate.controlnets import ControlNets, baked_dir
from sdcog.generate.engine import Engine
from sdcog.model.families import SD1, SDXL
from sdcog.resolve.control import ControlSlot
from sdcog.resolve.request import ModelLimits, resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext, write_outputs
from sdcog_tools.random_pipelines import random_controlnet

pytestmark = pytest.mark.usefixtures("local_urls")

REPOSITORY = "tests/tiny-controlnet"


def _controlnet_file(pipeline_dir: Path, out: Path, seed: int) -> Path:
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    controlnet = random_controlnet(unet, seed)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_sd15, tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {
        "sd15": _controlnet_file(tiny_sd15, root / "sd15", 1),
        "sd15-other": _controlnet_file(tiny_sd15, root / "sd15-other", 2),
        "sdxl": _controlnet_file(tiny_sdxl, root / "sdxl", 3),
    }


@pytest.fixture(scope="module")
def server(controlnet_dirs, tiny_sd15, tmp_path_factory):
    def weights(name):
        return (controlnet_dirs[name] / "diffusion_pytorch_model.safetensors").read_bytes()

    lora = make_lora(tiny_sd15, tmp_path_factory.mktemp("lora") / "lora.safetensors", seed=1)
    served = StaticServer(
        {
            "/sd15.safetensors": weights("sd15"),
            "/other.safetensors": weights("sd15-other"),
            "/sdxl.safetensors": weights("sdxl"),
            "/lora.safetensors": lora.read_bytes(),
            # a Hugging Face repository in diffusers format, as the hub serves its files
            f"/{REPOSITORY}/resolve/main/config.json": (controlnet_dirs["sd15"] / "config.json").read_bytes(),
            f"/{REPOSITORY}/resolve/main/diffusion_pytorch_model.safetensors": weights("sd15"),
        }
    )
    yield served
    served.close()


@pytest.fixture
def controlnets(sd15, tmp_path):
    return ControlNets(
        sd15.pipeline.unet,
        torch.float32,
        torch.device("cpu"),
        AdapterCache(tmp_path / "controlnets", 10**9, 10**8),
        baked=tmp_path / "baked",
    )


def edges(offset: int = 0, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((10 + offset, 12, 40 + offset, 50), outline=(255, 255, 255), width=2)
    return image


def _modes() -> tuple[dict, ...]:
    """The inputs of text-to-image, image-to-image and inpainting at 64x64."""
    init = Image.new("RGB", (64, 64), (40, 70, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 64, 64))
    return ({}, {"image": init}, {"image": init, "mask": mask})


MODES = _modes()


def prepared(engine, slots=(), **inputs):
    """A 64x64 request of 4 steps, seed 5 (`inputs` override them), its control maps made."""
    options = dict(
        prompt="a red circle on a blue background", width=64, height=64, num_inference_steps=4, seed=5
    )
    options.update(inputs)
    return ControlMaps().prepare(resolve_request(engine.limits, controlnets=list(slots), **options))


def run(engine, controlnets, slots=(), **inputs):
    """One 64x64 image (int16 pixels) and the Generation, its ControlNets fetched and released."""
    request = prepared(engine, slots, **inputs)
    loaded = controlnets.fetch_for(request) if slots else ()
    try:
        generation = engine.generate(request, adapters=FetchedAdapters(controlnets=loaded))
    finally:
        controlnets.release(loaded)
    return np.asarray(generation.images[0], dtype=np.int16), generation


def test_a_controlnet_steers_each_mode_and_leaves_nothing_behind(sd15, controlnets, server):
    url = f"{server.url}/sd15.safetensors"
    for mode_inputs in MODES:
        plain, _ = run(sd15, controlnets, **mode_inputs)
        steered, generation = run(sd15, controlnets, [ControlSlot(url, edges())], **mode_inputs)
        assert np.abs(steered - plain).mean() > 2, mode_inputs
        assert [item.control.field for item in generation.controlnets] == ["controlnet_1"]
        again, _ = run(sd15, controlnets, **mode_inputs)
        assert np.array_equal(again, plain), "a request without ControlNet runs exactly as before"
        # conditioning scale 0: the uncontrolled image
        off, _ = run(sd15, controlnets, [ControlSlot(url, edges(), 0.0)], **mode_inputs)
        assert np.abs(off - plain).max() <= 1, mode_inputs
    assert not hasattr(sd15.pipeline, "controlnet") or sd15.pipeline.controlnet is None


def test_two_controlnets_steer_together_with_their_own_scales_and_windows(sd15, controlnets, server):
    first, second = f"{server.url}/sd15.safetensors", f"{server.url}/other.safetensors"
    one, _ = run(sd15, controlnets, [ControlSlot(first, edges())])
    both, generation = run(sd15, controlnets, [ControlSlot(first, edges()), ControlSlot(second, edges(12))])
    assert len(generation.controlnets) == 2 and np.abs(both - one).mean() > 1
    # the second with scale 0 adds nothing
    muted, _ = run(sd15, controlnets, [ControlSlot(first, edges()), ControlSlot(second, edges(12), 0.0)])
    assert np.abs(muted - one).max() <= 1
    # start/end: steering only the last quarter changes less than steering throughout
    late, _ = run(sd15, controlnets, [ControlSlot(first, edges(), 1.0, 0.75, 1.0)])
    plain, _ = run(sd15, controlnets)
    assert np.abs(late - plain).mean() < np.abs(one - plain).mean()


def test_fetched_once_loaded_once_and_a_hugging_face_repository_reads_its_config(
    sd15, controlnets, server, monkeypatch
):
    url = f"{server.url}/sd15.safetensors"
    before = server.count("/sd15.safetensors")
    first, _ = run(sd15, controlnets, [ControlSlot(url, edges())])
    second, _ = run(sd15, controlnets, [ControlSlot(url, edges())])
    assert np.array_equal(first, second)
    assert server.count("/sd15.safetensors") == before + 1 and controlnets.cache.downloads == 1
    assert controlnets.loads == 1
    # The same weights from a Hugging Face repository (config.json and weights, through HF_ENDPOINT):
    # the same pixels, and the model loaded once (by the weights' hash).
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    reference = f"huggingface.co/{REPOSITORY}/diffusion_pytorch_model.safetensors"
    from_hub, generation = run(sd15, controlnets, [ControlSlot(reference, edges())])
    assert np.array_equal(from_hub, first) and controlnets.loads == 1
    assert server.count(f"/{REPOSITORY}/resolve/main/config.json") == 1
    assert generation.controlnets[0].control.name == "tiny-controlnet"


def test_a_baked_controlnet_is_read_from_the_image_without_a_download(sd15, controlnets, controlnet_dirs):
    import shutil

    shutil.copytree(controlnet_dirs["sd15"], baked_dir(REPOSITORY, controlnets.baked))
    image, generation = run(sd15, controlnets, [ControlSlot(f"huggingface.co/{REPOSITORY}", edges())])
    assert controlnets.cache.downloads == 0 and generation.controlnets[0].file is None


def test_batched_requests_with_controlnets_match_each_alone(sd15, controlnets, server):
    url = f"{server.url}/sd15.safetensors"
    cases = ((0, 1), (12, 2), (6, 3))
    requests = [prepared(sd15, [ControlSlot(url, edges(offset))], seed=seed) for offset, seed in cases]
    loaded = [controlnets.fetch_for(request) for request in requests]
    alone = [
        np.asarray(
            sd15.generate(request, adapters=FetchedAdapters(controlnets=item)).images[0], dtype=np.int16
        )
        for request, item in zip(requests, loaded, strict=True)
    ]
    batcher = Batcher(sd15, max_batch=8)
    jobs = [
        batcher.submit(request, FetchedAdapters(controlnets=item))
        for request, item in zip(requests, loaded, strict=True)
    ]
    batched = [np.asarray(job.future.result().images[0], dtype=np.int16) for job in jobs]
    assert max(job.batch_size for job in jobs) > 1
    for one, other in zip(alone, batched, strict=True):
        assert np.abs(one - other).max() <= 2
    assert np.abs(alone[0] - alone[1]).mean() > 1  # each its own map


def test_sdxl_controlnets_run_in_every_mode_and_an_sd15_one_is_refused(tiny_sdxl, server, tmp_path):
    engine = Engine.load(tiny_sdxl)
    controlnets = ControlNets(
        engine.pipeline.unet, torch.float32, torch.device("cpu"), AdapterCache(tmp_path / "c", 10**9, 10**8)
    )
    url = f"{server.url}/sdxl.safetensors"
    for mode_inputs in MODES:
        plain, _ = run(engine, controlnets, **mode_inputs)
        steered, _ = run(engine, controlnets, [ControlSlot(url, edges())], **mode_inputs)
        assert np.abs(steered - plain).mean() > 1, mode_inputs
    with pytest.raises(InputError) as refused:
        run(engine, controlnets, [ControlSlot(f"{server.url}/sd15.safetensors", edges())])
    assert refused.value.field == "controlnet_1"
    assert "Stable Diffusion XL" in str(refused.value)


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/sdxl.safetensors", "for Stable Diffusion XL; this model is"),
        ("/lora.safetensors", "is not a ControlNet for this model"),
        ("/missing.safetensors", "404"),
    ],
)
def test_what_is_not_a_controlnet_for_this_model_is_refused_naming_the_slot(
    sd15, controlnets, server, path, words
):
    slots = [
        ControlSlot(f"{server.url}/sd15.safetensors", edges()),
        ControlSlot(f"{server.url}{path}", edges()),
    ]
    with pytest.raises(InputError) as refused:
        run(sd15, controlnets, slots)
    assert refused.value.field == "controlnet_2" and words in str(refused.value), refused.value
    assert not controlnets.cache._in_use, "a refused request holds no file"


LIMITS = ModelLimits(SD1, 512, 512)


def resolve(**inputs):
    return resolve_request(LIMITS, prompt="a cat", **inputs)


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        ({"controlnets": [ControlSlot("canny")]}, "controlnet_1_image", "is required"),
        ({"controlnets": [ControlSlot(None, edges())]}, "controlnet_1_image", "names no ControlNet"),
        (
            {"controlnets": [ControlSlot("canny", edges(), 4.5)]},
            "controlnet_1_conditioning_scale",
            "between 0",
        ),
        ({"controlnets": [ControlSlot("canny", edges(), 1.0, 0.6, 0.4)]}, "controlnet_1_start", "below"),
        ({"controlnets": [ControlSlot("canny", edges(), 1.0, 0.0, 1.5)]}, "controlnet_1_end", "between 0"),
        (
            {"controlnets": [ControlSlot("canny", edges(), preprocessor="hed")]},
            "controlnet_1_preprocessor",
            "one of",
        ),
        ({"controlnets": [ControlSlot("cany", edges())]}, "controlnet_1", "not a ControlNet name"),
        ({"controlnets": [ControlSlot("canny", edges()), ControlSlot("lineart", edges())]}, None, None),
        ({"controlnets": [ControlSlot("canny", edges())] * 4}, "controlnet", "the limit is 3"),
        ({"canny_low_threshold": 250}, "canny_low_threshold", "above canny_high_threshold"),
        ({"canny_high_threshold": 0}, "canny_high_threshold", "between 1 and 255"),
        ({"return_control_maps": True}, "return_control_maps", "no ControlNet"),
        ({"sizing_strategy": "input_image"}, "sizing_strategy", "no image"),
        ({"sizing_strategy": "controlnet_2_image"}, "sizing_strategy", "controlnet_2 is not used"),
        ({"sizing_strategy": "biggest"}, "sizing_strategy", "one of"),
    ],
)
def test_controlnet_inputs_are_checked_naming_the_field(inputs, field, words):
    if field is None:
        resolve(**inputs)
        return
    with pytest.raises(InputError) as refused:
        resolve(**inputs)
    assert refused.value.field == field and words in str(refused.value), refused.value


def test_a_name_without_a_controlnet_for_the_family_says_which_names_it_has():
    with pytest.raises(InputError) as refused:
        resolve_request(
            ModelLimits(SDXL, 1024, 1024), prompt="a cat", controlnets=[ControlSlot("lineart", edges())]
        )
    assert refused.value.field == "controlnet_1" and "canny" in str(refused.value)


def test_sizing_strategies_pick_the_output_size():
    photo = Image.new("RGB", (300, 200))
    control = Image.new("RGB", (200, 304))
    slot = [ControlSlot("canny", control)]
    # auto: today's rule (the image's size; width/height win; native without an image)
    assert (resolve(image=photo, controlnets=slot).width, resolve(image=photo, controlnets=slot).height) == (
        304,
        200,
    )
    assert resolve(image=photo, width=256, height=256, controlnets=slot).width == 256
    assert resolve(controlnets=slot).width == 512
    # the others
    assert resolve(image=photo, width=256, height=256, sizing_strategy="input_image").width == 304
    sized = resolve(image=photo, sizing_strategy="width_height")
    assert (sized.width, sized.height) == (512, 512)
    sized = resolve(controlnets=slot, sizing_strategy="controlnet_1_image")
    assert (sized.width, sized.height) == (200, 304)
    assert sized.controlnets[0].image.size == (200, 304)
    # a control map of another aspect ratio is fitted by cropping, never stretched
    fitted = resolve(
        controlnets=[ControlSlot("canny", edges(size=64).resize((128, 64)))], width=64, height=64
    )
    assert fitted.controlnets[0].image.size == (64, 64)


def test_canny_makes_white_edges_on_black_and_the_names_pick_their_preprocessor():
    request = resolve(controlnets=[ControlSlot("canny", edges())], width=64, height=64)
    assert request.controlnets[0].preprocessor == "canny"
    mapped = ControlMaps().prepare(request).controlnets[0].control_map
    values = np.asarray(mapped)
    assert set(np.unique(values)) <= {0, 255} and (values == 255).mean() > 0.02
    assert np.array_equal(values, np.asarray(canny_edges(request.controlnets[0].image, 100, 200)))
    assert resolve(controlnets=[ControlSlot("openpose", edges())]).controlnets[0].preprocessor == "none"
    assert (
        resolve(controlnets=[ControlSlot("canny", edges(), preprocessor="none")]).controlnets[0].preprocessor
        == "none"
    )


def test_depth_without_its_weights_is_refused_saying_how_to_get_them(tmp_path):
    request = resolve(controlnets=[ControlSlot("depth", edges())], width=64, height=64)
    with pytest.raises(InputError) as refused:
        ControlMaps(tmp_path).prepare(request)
    assert refused.value.field == "controlnet_1_preprocessor"
    assert "script/download-weights --preprocessor depth" in str(refused.value)


def test_the_control_maps_come_back_after_the_images_and_the_metadata_names_each_unit(
    sd15, controlnets, server, tmp_path
):
    url = f"{server.url}/sd15.safetensors"
    slot = ControlSlot(url, edges(), 0.7, 0.1, 0.9, "canny")
    request = prepared(sd15, [slot], num_inference_steps=2, num_outputs=2, return_control_maps=True)
    loaded = controlnets.fetch_for(request)
    generation = sd15.generate(request, adapters=FetchedAdapters(controlnets=loaded))
    paths = write_outputs(generation, request, "tiny", tmp_path)
    assert [path.name for path in paths] == ["out-0.webp", "out-1.webp", "control-1.png"]
    with Image.open(paths[2]) as control_map:
        assert np.array_equal(
            np.asarray(control_map.convert("RGB")), np.asarray(request.controlnets[0].control_map)
        )
    fields = parse_infotext_fields(read_infotext(paths[0]))
    unit = fields["ControlNet 0"]
    assert "Module: canny" in unit and "Weight: 0.7" in unit and "Guidance Start: 0.1" in unit
    assert f"[{loaded[0].hash[:8]}]" in unit and "Threshold A: 100" in unit


def test_download_weights_bakes_a_controlnet_that_requests_then_read_without_fetching(
    sd15, server, controlnet_dirs, tmp_path, monkeypatch
):
    from sdcog_tools.download import DownloadError, bake_controlnet

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    baked = bake_controlnet(f"huggingface.co/{REPOSITORY}", "sd1", root=tmp_path / "baked")
    assert baked == baked_dir(REPOSITORY, tmp_path / "baked")
    # The repository has no fp16 file: the full one is taken, whole and verified.
    assert sorted(path.name for path in baked.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    controlnets = ControlNets(
        sd15.pipeline.unet,
        torch.float32,
        torch.device("cpu"),
        AdapterCache(tmp_path / "c", 10**9, 10**8),
        baked=tmp_path / "baked",
    )
    run(sd15, controlnets, [ControlSlot(f"huggingface.co/{REPOSITORY}", edges())])
    assert controlnets.cache.downloads == 0
    with pytest.raises(DownloadError, match="no ControlNet for sdxl"):
        bake_controlnet("lineart", "sdxl", root=tmp_path / "baked")


def test_download_weights_bakes_the_depth_preprocessor_which_then_makes_depth_maps(tmp_path, monkeypatch):
    from sdcog_tools.download import DEPTH_REPOSITORY, bake_preprocessor
    from sdcog_tools.random_pipelines import save_depth_estimator

    estimator = save_depth_estimator(tmp_path / "estimator")
    hub = StaticServer(
        {f"/{DEPTH_REPOSITORY}/resolve/main/{path.name}": path.read_bytes() for path in estimator.iterdir()}
    )
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        baked = bake_preprocessor("depth", root=tmp_path / "preprocessors")
    finally:
        hub.close()
    assert sorted(path.name for path in baked.iterdir()) == sorted(path.name for path in estimator.iterdir())
    photo = Image.new("RGB", (96, 64), (90, 120, 200))
    ImageDraw.Draw(photo).ellipse((20, 10, 60, 50), fill=(240, 200, 40))
    request = resolve(controlnets=[ControlSlot("depth", photo)], width=96, height=64)
    assert request.controlnets[0].preprocessor == "depth"
    depth = np.asarray(ControlMaps(tmp_path / "preprocessors").prepare(request).controlnets[0].control_map)
    assert depth.shape == (64, 96, 3) and (depth[..., 0] == depth[..., 1]).all()  # grey, at the output size
    assert depth.min() == 0 and depth.max() == 255  # normalised to the full range


def test_a_controlnet_works_with_a_lora_and_the_lora_still_counts(sd15, controlnets, server, tmp_path):
    url = f"{server.url}/sd15.safetensors"
    adapters = AdapterCache(tmp_path / "adapters", 10**9, 10**8)
    request = prepared(sd15, [ControlSlot(url, edges())], lora_weights=f"{server.url}/lora.safetensors")
    fetched = adapters.fetch_for(request)
    loaded = controlnets.fetch_for(request)
    both = sd15.generate(request, adapters=dataclasses.replace(fetched, controlnets=loaded))
    adapters.release(fetched)
    controlnet_only, _ = run(sd15, controlnets, [ControlSlot(url, edges())])
    with_both = np.asarray(both.images[0], dtype=np.int16)
    assert np.abs(with_both - controlnet_only).mean() > 1
    assert [lora.name for lora in both.loras] == ["lora"] and len(both.controlnets) == 1
