"""Single-file checkpoints, loaded offline: each family the project has (and an inpainting and a
v-prediction variant) draws the same pixels as the same weights in diffusers format; what the file
is, is read from its tensors; damaged, pickled and mislabelled files are refused naming them.
Few-step defaults, clip_skip, a separate VAE and the Model hash."""

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdcog.generate.engine import Engine
from sdcog.model.checkpoints import inspect_checkpoint
from sdcog.model.weights import SOURCE_FILE, WeightsError, resolve_weights_dir
from sdcog.resolve.few_step import FEW_STEP_KINDS
from sdcog.resolve.request import Mode, resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import read_infotext, write_outputs
from sdcog_tools.random_pipelines import save_pipeline
from sdcog_tools.single_file_checkpoints import save_checkpoint_dir

PRESETS = ("tiny-sd15", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl-distinct-encoders", "tiny-sd15-inpainting")


@pytest.fixture(scope="module")
def folders(tiny_pipelines, tmp_path_factory) -> dict:
    """Each preset in diffusers format (the session's tiny SD 1.5 and SDXL, the others made here)."""
    root = tmp_path_factory.mktemp("checkpoint-presets")
    return {
        preset: tiny_pipelines.get(preset) or save_pipeline(preset, root / preset, seed=0)
        for preset in PRESETS
    }


@pytest.fixture(scope="module")
def checkpoints(folders, tmp_path_factory) -> dict:
    """Each preset as one original-layout .safetensors beside its configs (no component weights)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {preset: save_checkpoint_dir(folder, root / preset) for preset, folder in folders.items()}


def image(engine: Engine, **inputs) -> np.ndarray:
    request = resolve_request(
        engine.limits,
        prompt=inputs.pop("prompt", "a red circle"),
        width=64,
        height=64,
        seed=inputs.pop("seed", 1),
        num_inference_steps=inputs.pop("num_inference_steps", 3),
        **inputs,
    )
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_checkpoint_loads_offline_and_draws_what_its_diffusers_folder_draws(preset, folders, checkpoints):
    from_folder, from_file = Engine.load(folders[preset]), Engine.load(checkpoints[preset].parent)
    info = from_file.weights.checkpoint
    assert info is not None and info.path == checkpoints[preset]
    assert from_file.family is from_folder.family and info.inpainting == preset.endswith("inpainting")
    assert info.prediction_type == ("v_prediction" if preset.endswith("-v") else "epsilon")
    assert from_file.pipeline.scheduler.config.prediction_type == info.prediction_type
    assert np.array_equal(image(from_folder), image(from_file))
    if info.inpainting:  # every mode, through the inpainting pipeline
        picture = Image.new("RGB", (64, 64), (200, 40, 40))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        for extra in ({"image": picture}, {"image": picture, "mask": mask}):
            assert np.array_equal(image(from_folder, **extra), image(from_file, **extra))
        inpainted = image(from_file, image=picture, mask=mask)
        assert np.abs(inpainted[:8] - np.asarray(picture, dtype=np.int16)[:8]).max() <= 1  # kept
        assert resolve_request(from_file.limits, prompt="x", width=64, height=64).inpainting_model


def test_the_setup_log_says_what_was_detected_and_why(checkpoints, caplog):
    info = inspect_checkpoint(checkpoints["tiny-sd2-v"])
    described = info.describe()
    assert "Stable Diffusion 2.x (cond_stage_model.model (OpenCLIP ViT-H)" in described
    assert "prediction: v_prediction (the scheduler config beside the file)" in described
    assert info.config_repository == "stabilityai/stable-diffusion-2-1"
    xl = inspect_checkpoint(checkpoints["tiny-sdxl-distinct-encoders"])
    assert xl.family.key == "sdxl" and "conditioner.embedders.1" in xl.reasons["family"]
    assert inspect_checkpoint(checkpoints["tiny-sd15-inpainting"]).config_repository.endswith("inpainting")


def test_markers_in_the_file_decide_before_the_setting_and_the_configs(folders, tmp_path, monkeypatch):
    file = save_checkpoint_dir(
        folders["tiny-sd2"], tmp_path / "a", extra_tensors={"v_pred": torch.tensor([])}
    )
    assert inspect_checkpoint(file).reasons["prediction_type"] == "a v_pred key in the file"
    monkeypatch.setenv("SDCOG_PREDICTION_TYPE", "v_prediction")
    plain = save_checkpoint_dir(folders["tiny-sd2"], tmp_path / "b")
    assert inspect_checkpoint(plain).prediction_type == "v_prediction"  # the setting, over the configs
    marked = save_checkpoint_dir(
        folders["tiny-sd2"], tmp_path / "c", metadata={"modelspec.prediction_type": "epsilon"}
    )
    assert inspect_checkpoint(marked).prediction_type == "epsilon"
    monkeypatch.setenv("SDCOG_PREDICTION_TYPE", "x")
    with pytest.raises(WeightsError, match="SDCOG_PREDICTION_TYPE"):
        inspect_checkpoint(plain)


def test_few_step_kinds_come_from_metadata_the_setting_or_the_name(folders, tmp_path, monkeypatch):
    turbo = save_checkpoint_dir(
        folders["tiny-sd15"], tmp_path / "t", metadata={"modelspec.title": "SD Turbo"}
    )
    assert inspect_checkpoint(turbo).few_step.kind == "turbo"
    named = save_checkpoint_dir(folders["tiny-sd15"], tmp_path / "n", name="sdxl_lightning_4step.safetensors")
    info = inspect_checkpoint(named)
    assert info.few_step.kind == "lightning-4" and "file's name" in info.reasons["few_step"]
    (named.parent / SOURCE_FILE).write_text(json.dumps({"few_step": "lcm"}))
    assert inspect_checkpoint(named).few_step.kind == "lcm"  # the declaration, over the name
    monkeypatch.setenv("SDCOG_FEW_STEP", "none")
    assert inspect_checkpoint(named).few_step is None


def test_few_step_defaults_fill_what_is_omitted_and_yield_to_what_is_given(checkpoints, tmp_path):
    engine = Engine.load(checkpoints["tiny-sd15"].parent)
    engine.few_step = FEW_STEP_KINDS["lightning-4"]
    request = resolve_request(engine.limits, prompt="x", width=64, height=64)
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler) == (4, 0.0, "K_EULER")
    given = resolve_request(
        engine.limits,
        prompt="x",
        width=64,
        height=64,
        num_inference_steps=9,
        guidance_scale=5,
        scheduler="DDIM",
    )
    assert (given.num_inference_steps, given.guidance_scale, given.scheduler) == (9, 5.0, "DDIM")
    scheduler = engine._pipeline_for(request).scheduler
    assert scheduler.config.timestep_spacing == "trailing"
    paths = write_outputs(
        engine.generate(request), request, engine.weights.name, tmp_path, engine.model_hash.short
    )
    fields = parse_infotext_fields(read_infotext(paths[0]))
    assert (
        fields["Steps"] == "4" and fields["Sampler"] == "Euler" and fields["Few-step"] == "Lightning 4-step"
    )
    digest = hashlib.sha256(checkpoints["tiny-sd15"].read_bytes()).hexdigest()
    assert fields["Model hash"] == digest[:10]
    # An LCM LoRA in lora_weights brings LCM's defaults to a model that has none.
    engine.few_step = None
    lcm = resolve_request(
        engine.limits, prompt="x", lora_weights="https://example.com/lcm-lora-sdv1-5.safetensors"
    )
    assert (lcm.num_inference_steps, lcm.guidance_scale, lcm.scheduler) == (4, 1.0, "LCM")
    plain = resolve_request(engine.limits, prompt="x")
    assert (plain.num_inference_steps, plain.scheduler) == (30, "DPM++ 2M Karras")


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl-distinct-encoders"])
def test_clip_skip_uses_an_earlier_layer_on_both_prompt_paths(preset, folders):
    engine = Engine.load(folders[preset])
    long_prompt = "a red circle on a blue background, " * 12  # over 75 tokens: encoded in windows
    for prompt in ("a red circle", long_prompt):
        last, earlier = image(engine, prompt=prompt), image(engine, prompt=prompt, clip_skip=2)
        assert np.abs(last - earlier).mean() > 0.5, prompt
        assert np.array_equal(image(engine, prompt=prompt), last)  # the layers are back afterwards
    with pytest.raises(Exception, match="clip_skip") as refused:
        image(engine, clip_skip=3)
    assert "2 layers" in str(refused.value)


def test_a_separate_vae_beside_the_checkpoint_replaces_the_models_own(folders, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    file = save_checkpoint_dir(folders["tiny-sd15"], tmp_path / "own")
    own = image(Engine.load(file.parent))
    other = save_checkpoint_dir(save_pipeline("tiny-sd15", tmp_path / "other", seed=5), tmp_path / "o")
    prefix = "first_stage_model."
    vae = {k.removeprefix(prefix): v for k, v in load_file(other).items() if k.startswith(prefix)}
    save_file(vae, file.parent / "model.vae.safetensors")  # original layout, AUTOMATIC1111's name
    assert np.abs(image(Engine.load(file.parent)) - own).mean() > 1
    (file.parent / "model.vae.safetensors").unlink()
    wrong = tmp_path / "xl-vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    monkeypatch.setenv("VAE_WEIGHTS", str(wrong))
    with pytest.raises(WeightsError, match="xl-vae.safetensors does not fit this model's VAE"):
        Engine.load(file.parent)


def refused(path, match):
    with pytest.raises(WeightsError, match=match) as error:
        inspect_checkpoint(path)
    assert str(path.name) in str(error.value)
    return str(error.value)


def test_damaged_pickled_and_mislabelled_files_are_refused_naming_them(checkpoints, folders, tmp_path):
    good = checkpoints["tiny-sd15"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) - 100])
    refused(truncated, "truncated")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert "script/convert-checkpoint" in refused(ckpt, "pickle")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    refused(disguised, "pickle")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)}, lora)
    refused(lora, "LoRA: give it in lora_weights")
    refiner = tmp_path / "refiner.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "conditioner.embedders.0.model.ln_final.weight": torch.zeros(8),
        },
        refiner,
    )
    assert "REFINER_WEIGHTS" in refused(refiner, "SDXL refiner")
    # An SDXL checkpoint beside SD 1.x configs: refused at setup, naming both.
    mixed = tmp_path / "mixed"
    save_checkpoint_dir(folders["tiny-sd15"], mixed)
    (mixed / "model.safetensors").write_bytes(checkpoints["tiny-sdxl-distinct-encoders"].read_bytes())
    with pytest.raises(WeightsError, match="do not fit it: they are for Stable Diffusion 1.x"):
        Engine.load(mixed)


def test_a_checkpoint_without_configs_says_to_fetch_them_once(checkpoints, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes(checkpoints["tiny-sd15"].read_bytes())
    with pytest.raises(WeightsError, match="script/download-weights .*model.safetensors"):
        resolve_weights_dir({"MODEL_WEIGHTS": str(lone)})
    with pytest.raises(WeightsError, match="script/download-weights"):
        resolve_weights_dir({"MODEL_WEIGHTS": str(lone / "model.safetensors")})
    # MODEL_WEIGHTS may name the file itself when its configs are beside it.
    assert resolve_weights_dir({"MODEL_WEIGHTS": str(checkpoints["tiny-sd15"])}) == checkpoints["tiny-sd15"]
    assert Engine.load(checkpoints["tiny-sd15"]).weights.checkpoint is not None
    assert Mode.TEXT_TO_IMAGE  # (imported for the inpainting test's readers)


class _Payload:
    """What a hostile pickle carries: unpickling it would call os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/sdcog-pickle-ran",))


def test_convert_checkpoint_keeps_the_tensors_and_refuses_code(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from sdcog_tools.convert_checkpoint import main

    tensors = load_file(checkpoints["tiny-sd15"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, ckpt)
    assert main([str(ckpt)]) == 0
    converted = load_file(tmp_path / "model.safetensors")
    assert converted.keys() == tensors.keys() and all(torch.equal(converted[k], tensors[k]) for k in tensors)
    assert inspect_checkpoint(tmp_path / "model.safetensors").family.key == "sd1"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": tensors, "payload": _Payload()}, hostile)
    import pathlib

    pathlib.Path("/tmp/sdcog-pickle-ran").unlink(missing_ok=True)
    assert main([str(hostile)]) == 1
    assert (
        not pathlib.Path("/tmp/sdcog-pickle-ran").exists() and not (tmp_path / "hostile.safetensors").exists()
    )


def test_a_pipeline_folder_with_its_single_file_beside_it_loads_as_the_folder(folders, checkpoints, tmp_path):
    """Hub repos such as SDXL base hold both; the folder (what download-weights fetches) wins."""
    import shutil

    both = tmp_path / "both"
    shutil.copytree(folders["tiny-sd15"], both)
    shutil.copy(checkpoints["tiny-sd15"], both / "sd15.safetensors")
    assert Engine.load(both).weights.checkpoint is None


def test_vae_weights_in_diffusers_layout_replace_a_folder_models_vae(folders, tmp_path, monkeypatch):
    """VAE_WEIGHTS applies to any model; a VAE file in diffusers' key layout (as the fp16-fix SDXL
    VAE's diffusion_pytorch_model.safetensors) is read as such; a folder too."""
    engine = Engine.load(folders["tiny-sd15"])
    own = image(engine)
    other = save_pipeline("tiny-sd15", tmp_path / "other", seed=5)
    monkeypatch.setenv("VAE_WEIGHTS", str(other / "vae" / "diffusion_pytorch_model.safetensors"))
    from_file = image(Engine.load(folders["tiny-sd15"]))
    monkeypatch.setenv("VAE_WEIGHTS", str(other / "vae"))
    from_folder = image(Engine.load(folders["tiny-sd15"]))
    assert np.array_equal(from_file, from_folder) and np.abs(from_file - own).mean() > 1
