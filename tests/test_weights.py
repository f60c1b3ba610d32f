"""Where weights are found, what makes a directory unusable, and what a download fetches."""

import json

import pytest

from sdcog import weights
from sdcog.weights import WeightsError, inspect_weights, resolve_weights_dir

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
}


def make_pipeline_dir(root, weight_name="model.safetensors"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / component).mkdir()
        (root / component / "config.json").write_text("{}")
        if component in ("unet", "vae", "text_encoder"):
            (root / component / weight_name).write_bytes(b"")
    return root


def test_model_weights_variable_wins(tmp_path):
    directory = make_pipeline_dir(tmp_path / "sd")
    assert resolve_weights_dir({"MODEL_WEIGHTS": str(directory)}) == directory


def test_model_weights_pointing_nowhere_says_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="MODEL_WEIGHTS=.*is not a diffusers pipeline directory"):
        resolve_weights_dir({"MODEL_WEIGHTS": str(tmp_path)})


def test_downloaded_weights_win_over_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", make_pipeline_dir(tmp_path / "weights"))
    assert resolve_weights_dir({}) == tmp_path / "weights"


def test_without_downloaded_weights_the_bundled_model_is_served(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights")
    assert resolve_weights_dir({}) == weights.BUNDLED_MODEL_DIR
    assert inspect_weights(weights.BUNDLED_MODEL_DIR).name == "shapes-sd"


def test_no_weights_at_all_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(weights, "BUNDLED_MODEL_DIR", tmp_path / "models" / "shapes-sd")
    with pytest.raises(WeightsError) as error:
        resolve_weights_dir({})
    message = str(error.value)
    assert "script/download-weights stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "script/train-bundled-model" in message and "MODEL_WEIGHTS" in message


def test_complete_directory_is_accepted_with_its_variant(tmp_path):
    full = inspect_weights(make_pipeline_dir(tmp_path / "full"))
    half = inspect_weights(make_pipeline_dir(tmp_path / "half", "model.fp16.safetensors"))
    assert (full.variant, half.variant) == (None, "fp16")
    assert full.name == "full"


def test_source_file_names_the_model(tmp_path):
    directory = make_pipeline_dir(tmp_path / "sd")
    (directory / weights.SOURCE_FILE).write_text(json.dumps({"model_id": "org/model"}))
    assert inspect_weights(directory).name == "org/model"


def test_missing_component_is_named(tmp_path):
    directory = make_pipeline_dir(tmp_path / "sd")
    (directory / "vae" / "model.safetensors").unlink()
    (directory / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        WeightsError, match=r"vae has no \.safetensors weights.*pickle files are never loaded"
    ):
        inspect_weights(directory)
    (directory / "vae" / "diffusion_pytorch_model.bin").unlink()
    (directory / "vae" / "config.json").unlink()
    (directory / "vae").rmdir()
    with pytest.raises(WeightsError, match="vae is missing"):
        inspect_weights(directory)


class FakeHub:
    """The two hub calls download_pipeline makes, answered from a fixed repo listing."""

    def __init__(self, files, tmp_path):
        self.files, self.tmp_path, self.fetched = files, tmp_path, None

    def install(self, monkeypatch):
        import huggingface_hub

        hub = self

        class Api:
            def __init__(self, token=None):
                pass

            def model_info(self, model_id, revision=None, files_metadata=False):
                siblings = [type("Sibling", (), {"rfilename": name}) for name in hub.files]
                return type("Info", (), {"sha": "abc123", "siblings": siblings})

            def hf_hub_download(self, model_id, filename, revision=None):
                path = hub.tmp_path / "model_index.json"
                path.write_text(json.dumps(MODEL_INDEX))
                return str(path)

        def snapshot_download(model_id, revision, local_dir, allow_patterns, token):
            hub.fetched = sorted(allow_patterns)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


REPO_FILES = [
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "scheduler/scheduler_config.json",
]


def test_download_fetches_one_fp16_safetensors_set_and_no_pickles(tmp_path, monkeypatch):
    hub = FakeHub(REPO_FILES, tmp_path)
    hub.install(monkeypatch)
    weights.download_pipeline("org/sd15", tmp_path / "weights")
    weight_files = [pattern for pattern in hub.fetched if pattern.endswith(".safetensors")]
    assert weight_files == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    source = json.loads((tmp_path / "weights" / weights.SOURCE_FILE).read_text())
    assert source == {"model_id": "org/sd15", "revision": "abc123", "variant": "fp16"}


def test_download_without_a_full_fp16_set_takes_full_precision(tmp_path, monkeypatch):
    files = [name for name in REPO_FILES if name != "vae/diffusion_pytorch_model.fp16.safetensors"]
    hub = FakeHub(files, tmp_path)
    hub.install(monkeypatch)
    weights.download_pipeline("org/sd15", tmp_path / "weights")
    assert [pattern for pattern in hub.fetched if pattern.endswith(".safetensors")] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_download_refuses_a_pickle_only_repo(tmp_path, monkeypatch):
    files = [name for name in REPO_FILES if not name.startswith("vae/") or name.endswith(".json")]
    files.append("vae/diffusion_pytorch_model.bin")
    FakeHub(files, tmp_path).install(monkeypatch)
    with pytest.raises(WeightsError, match="component vae has no .safetensors weights"):
        weights.download_pipeline("org/sd15", tmp_path / "weights")
