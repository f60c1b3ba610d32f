"""What makes a pipeline directory unusable and what the message says to run (sdcog.model.weights_check):
the checks before loading, and the wording of a load that fails anyway."""

import json
import shutil
import time

import pytest
from pipeline_dirs import WEIGHT_STEMS, make_pipeline_dir
from safetensors.numpy import save_file

from sdcog.model import weights
from sdcog.model.weights import DEFAULT_MODEL_ID, SOURCE_FILE, WeightsError
from sdcog.model.weights_check import explain_load_error, inspect_weights

DEFAULT_COMMAND = f"script/download-weights {DEFAULT_MODEL_ID}"


@pytest.fixture
def shapes(tmp_path):
    """A copy of the bundled model (9 MB) to damage."""
    return shutil.copytree(weights.BUNDLED_MODEL_DIR, tmp_path / "shapes-copy")


def from_hub(directory, model_id="org/sd-model", **extra):
    """Mark `directory` as fetched by script/download-weights from `model_id`."""
    source = {"model_id": model_id, "revision": "0" * 40, "variant": None, **extra}
    (directory / SOURCE_FILE).write_text(json.dumps(source))
    return directory


def failure(directory):
    with pytest.raises(WeightsError) as error:
        inspect_weights(directory)
    return str(error.value)


def truncate(path, size):
    with path.open("r+b") as file:
        file.truncate(size)


def test_complete_directory_is_accepted_with_its_variant(tmp_path):
    full = inspect_weights(make_pipeline_dir(tmp_path / "full"))
    half = inspect_weights(make_pipeline_dir(tmp_path / "half", variant="fp16"))
    assert (full.variant, half.variant) == (None, "fp16")
    assert full.name == "full"


def test_source_file_names_the_model(tmp_path):
    directory = make_pipeline_dir(tmp_path / "sd")
    (directory / weights.SOURCE_FILE).write_text(json.dumps({"model_id": "org/model"}))
    assert inspect_weights(directory).name == "org/model"


def test_truncated_weights_name_the_file_and_the_download_command(shapes):
    from_hub(shapes, "org/sd-model")
    unet = shapes / "unet" / "diffusion_pytorch_model.safetensors"
    truncate(unet, 1_000_000)
    message = failure(shapes)
    assert message.startswith(f"{unet} is truncated: 1,000,000 bytes on disk, but its header describes 4,")
    assert f"Delete it, then run `script/download-weights org/sd-model --dest {shapes}`" in message
    assert "MODEL_WEIGHTS" in message


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda path: truncate(path, 0), "is empty (0 bytes)"),
        (lambda path: truncate(path, 100), "is truncated: 100 bytes on disk, but its header alone is"),
        (lambda path: path.write_bytes(path.read_bytes() + b"\0" * 16), "has 16 bytes more than its header"),
        (lambda path: path.write_text("<!DOCTYPE html><html>502 Bad Gateway</html>"), "is an HTML/XML page"),
        (
            lambda path: path.write_text("version https://git-lfs.github.com/spec/v1\nsize 486936\n"),
            "is a Git LFS pointer",
        ),
        (lambda path: path.write_bytes(b"PK\x03\x04" + bytes(4096)), "is not a safetensors file"),
        (
            lambda path: path.write_bytes((20).to_bytes(8, "little") + b"{not a json header} "),
            "is not a valid",
        ),
    ],
    ids=["empty", "cut-in-header", "extra-bytes", "html-page", "lfs-pointer", "zip", "bad-header"],
)
def test_damaged_weights_file_is_named_with_what_went_wrong(shapes, damage, says):
    text_encoder = shapes / "text_encoder" / "model.safetensors"
    damage(text_encoder)
    message = failure(shapes)
    assert message.startswith(f"{text_encoder} {says}")
    assert (
        f"then run `{DEFAULT_COMMAND} --dest {shapes}` (or the hub repo id these weights came from)"
        in message
    )


def test_weights_dir_gets_the_command_without_dest(shapes, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", from_hub(shapes, "org/sd-model"))
    truncate(shapes / "vae" / "diffusion_pytorch_model.safetensors", 5000)
    assert "run `script/download-weights org/sd-model` to fetch it again" in failure(shapes)


def test_damaged_bundled_model_says_how_to_restore_it(shapes, monkeypatch):
    monkeypatch.setattr(weights, "BUNDLED_MODEL_DIR", shapes)
    unet = shapes / "unet" / "diffusion_pytorch_model.safetensors"
    truncate(unet, 2_000_000)
    message = failure(shapes)
    assert message.startswith(f"{unet} is truncated")
    assert "`git checkout -- models/shapes-sd`" in message and "`script/train-bundled-model`" in message
    assert "download-weights" not in message


@pytest.mark.parametrize(
    "damaged, says",
    [
        ("unet/config.json", "is missing"),
        ("scheduler/scheduler_config.json", "is missing"),
        ("text_encoder/config.json", "is not valid JSON"),
        ("tokenizer/tokenizer_config.json", "is empty"),
        ("model_index.json", "is not valid JSON"),
    ],
)
def test_missing_or_unparseable_config_is_named(shapes, damaged, says):
    path = shapes / damaged
    if says == "is missing":
        path.unlink()
    elif says == "is empty":
        path.write_text("")
    else:
        path.write_text(path.read_text()[:40])  # cut short, like an interrupted copy
    message = failure(shapes)
    assert message.startswith(f"{path} {says}")
    assert f"`{DEFAULT_COMMAND} --dest {shapes}`" in message


def test_several_problems_are_listed_together(shapes):
    truncate(shapes / "unet" / "diffusion_pytorch_model.safetensors", 10_000)
    (shapes / "scheduler" / "scheduler_config.json").unlink()
    message = failure(shapes)
    assert message.startswith(f"{shapes} is not a complete pipeline:\n")
    assert f"- {shapes / 'scheduler' / 'scheduler_config.json'} is missing" in message
    assert f"- {shapes / 'unet' / 'diffusion_pytorch_model.safetensors'} is truncated" in message
    assert f"Delete {shapes / 'unet' / 'diffusion_pytorch_model.safetensors'}, then run" in message


def test_clip_tokenizer_needs_vocab_and_merges_or_tokenizer_json(shapes):
    """Without them transformers 5 loads a 2-token tokenizer without a word of warning."""
    tokenizer = shapes / "tokenizer"
    (tokenizer / "vocab.json").unlink()
    (tokenizer / "merges.txt").unlink()
    assert inspect_weights(shapes)  # tokenizer.json alone is enough
    (tokenizer / "tokenizer.json").unlink()
    message = failure(shapes)
    assert message.startswith(f"{tokenizer / 'vocab.json'} and {tokenizer / 'merges.txt'} are missing")
    assert "tokenizer.json" in message and DEFAULT_COMMAND in message


def test_feature_extractor_needs_its_preprocessor_config(shapes):
    model_index = json.loads((shapes / "model_index.json").read_text())
    model_index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (shapes / "model_index.json").write_text(json.dumps(model_index))
    (shapes / "feature_extractor").mkdir()
    message = failure(shapes)
    assert message.startswith(f"{shapes / 'feature_extractor' / 'preprocessor_config.json'} is missing")
    (shapes / "feature_extractor" / "preprocessor_config.json").write_text('{"crop_size": 224}')
    assert inspect_weights(shapes)


def test_missing_component_is_named(tmp_path):
    directory = make_pipeline_dir(tmp_path / "sd")
    weights_file = directory / "vae" / "diffusion_pytorch_model.safetensors"
    weights_file.unlink()
    (directory / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")
    message = failure(directory)
    assert message.startswith(f"{weights_file} is missing (only diffusion_pytorch_model.bin: pickle files")
    shutil.rmtree(directory / "vae")
    assert failure(directory).startswith(f"{directory / 'vae'} is missing (model_index.json names it)")


def shard(component_dir, stem, variant=None, parts=2):
    """Split `stem[.variant].safetensors` into shards and an index, named as diffusers saves them."""
    from safetensors.numpy import load_file

    infix = f".{variant}" if variant else ""
    single = component_dir / f"{stem}{infix}.safetensors"
    tensors = load_file(str(single))
    names = sorted(tensors)
    weight_map = {}
    for part in range(parts):
        shard_name = f"{stem}{infix}-{part + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {name: tensors[name] for name in names[part::parts]}
        save_file(chunk, str(component_dir / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard_name))
    index = component_dir / f"{stem}.safetensors.index{infix}.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    single.unlink()
    return index


def test_sharded_weights_need_every_shard_listed_and_complete(shapes):
    index = shard(shapes / "unet", "diffusion_pytorch_model", parts=3)
    assert inspect_weights(shapes).variant is None
    second = shapes / "unet" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    truncate(second, second.stat().st_size - 1)
    assert failure(shapes).startswith(f"{second} is truncated")
    second.unlink()
    message = failure(shapes)
    assert message.startswith(f"{second} is missing ({index.name} lists it)")
    assert DEFAULT_COMMAND in message
    index.write_text('{"weight_map": ')
    assert failure(shapes).startswith(f"{index} is not valid JSON")


def fp16_names(directory, components=("unet", "vae", "text_encoder")):
    """Rename components' weights to the fp16 variant's names (the bytes need not be fp16 for the checks)."""
    for component in components:
        stem = WEIGHT_STEMS[component]
        (directory / component / f"{stem}.safetensors").rename(
            directory / component / f"{stem}.fp16.safetensors"
        )


def test_fp16_variant_is_detected_also_when_sharded(shapes):
    fp16_names(shapes)
    shard(shapes / "text_encoder", "model", variant="fp16")
    assert inspect_weights(shapes).variant == "fp16"


def test_mixed_variants_name_the_component_without_its_fp16_file(shapes):
    fp16_names(shapes, ("unet", "text_encoder"))
    message = failure(shapes)
    missing = shapes / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    assert message.startswith(f"{missing} is missing (text_encoder, unet have fp16 weights;")
    assert "vae has only full-precision weights" in message and DEFAULT_COMMAND in message


def test_the_downloaded_variant_decides_over_stray_files(shapes):
    fp16_names(shapes, ("unet",))
    from_hub(shapes, "org/sd-model", variant=None)  # a full-precision download over an old fp16 one
    assert failure(shapes).startswith(f"{shapes / 'unet' / 'diffusion_pytorch_model.safetensors'} is missing")
    shutil.copy(weights.BUNDLED_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors", shapes / "unet")
    assert inspect_weights(shapes).variant is None


def test_download_marked_unfinished_is_reported_as_interrupted(shapes):
    from_hub(shapes, "org/sd-model", complete=False)
    message = failure(shapes)
    assert message.startswith(
        f"{shapes / SOURCE_FILE} says the download of org/sd-model into {shapes} did not"
    )
    assert f"Run `script/download-weights org/sd-model --dest {shapes}` to finish it" in message


def hub_partial_file(directory, filename, etag):
    """Where huggingface_hub 2.4 writes `filename` while downloading it into `directory` (local_dir)."""
    from huggingface_hub._local_folder import get_local_download_paths

    paths = get_local_download_paths(directory, filename)
    incomplete = paths.incomplete_path(etag)
    return incomplete.with_name(f"{incomplete.stem}.1a2b3c4d.incomplete"), paths.metadata_path


def test_hub_incomplete_file_left_by_a_killed_download_is_reported(shapes):
    etag = "a" * 64
    leftover, metadata = hub_partial_file(shapes, "unet/diffusion_pytorch_model.safetensors", etag)
    leftover.write_bytes(b"partial")
    message = failure(shapes)
    assert message.startswith(f"{leftover} is left over from an interrupted download into {shapes}")
    assert f"`{DEFAULT_COMMAND} --dest {shapes}`" in message and "to finish it" in message
    # A later run that finished the same file (same etag) leaves the leftover behind: not an error.
    metadata.write_text(f"{'0' * 40}\n{etag}\n{time.time()}\n")
    assert inspect_weights(shapes)


def test_checks_read_headers_only(tmp_path):
    """A 5 GB UNet (sparse: no real data) is checked in milliseconds; cut by one byte it is refused."""
    directory = make_pipeline_dir(tmp_path / "big")
    unet = directory / "unet" / "diffusion_pytorch_model.safetensors"
    header = json.dumps({"w": {"dtype": "F16", "shape": [2500, 1_000_000], "data_offsets": [0, 5 * 10**9]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with unet.open("wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        file.truncate(8 + len(header) + 5 * 10**9)
    started = time.perf_counter()
    inspect_weights(directory)
    assert time.perf_counter() - started < 1.0
    truncate(unet, unet.stat().st_size - 1)
    assert failure(directory).startswith(f"{unet} is truncated: 5,000,0")


def test_load_error_that_slips_past_the_checks_names_the_component(shapes):
    """Weights that do not match their config.json pass the checks; diffusers' error is worded."""
    import diffusers

    config = json.loads((shapes / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 32  # the weights were trained with 64
    (shapes / "unet" / "config.json").write_text(json.dumps(config))
    from_hub(shapes, "org/sd-model")
    inspect_weights(shapes)
    with pytest.raises(Exception) as raised:
        diffusers.StableDiffusionPipeline.from_pretrained(shapes, local_files_only=True, use_safetensors=True)
    message = str(explain_load_error(shapes, raised.value))
    assert message.startswith(f"Loading {shapes / 'unet'} failed (ValueError: ")
    assert f"Delete it, then run `script/download-weights org/sd-model --dest {shapes}`" in message


def test_load_error_naming_a_file_names_that_file(shapes):
    weights_file = shapes / "vae" / "diffusion_pytorch_model.safetensors"
    error = OSError(f"Unable to load weights from checkpoint file for '{weights_file}' at '{weights_file}'.")
    message = str(explain_load_error(shapes, error))
    assert message.startswith(f"Loading {weights_file} failed (OSError: Unable to load weights")
    assert DEFAULT_COMMAND in message


def test_load_error_after_a_file_was_damaged_since_the_checks_gets_their_message(shapes):
    inspect_weights(shapes)
    unet = shapes / "unet" / "diffusion_pytorch_model.safetensors"
    truncate(unet, 4096)
    message = str(explain_load_error(shapes, RuntimeError("Error while deserializing header")))
    assert message.startswith(f"{unet} is truncated") and DEFAULT_COMMAND in message


def test_load_error_without_a_path_names_the_directory_and_memory_is_not_blamed_on_files(shapes):
    assert str(explain_load_error(shapes, KeyError("up_blocks.0"))).startswith(f"Loading {shapes} failed")
    message = str(explain_load_error(shapes, MemoryError()))
    assert message.startswith(f"Ran out of memory while loading {shapes}") and "download" not in message
