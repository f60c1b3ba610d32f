"""Where weights are found (and what the message says to run when there are none), and what a
download fetches. The checks of a directory's contents are in tests/test_weights_check.py."""

import json

import pytest
from pipeline_dirs import MODEL_INDEX

from sdcog.model import weights
from sdcog.model.weights import SOURCE_FILE, WeightsError, resolve_weights_dir
from sdcog.model.weights_check import inspect_weights


def pipeline_dir(root):
    """A directory resolve_weights_dir takes for a pipeline: it looks for model_index.json only."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root


def test_model_weights_variable_wins(tmp_path):
    directory = pipeline_dir(tmp_path / "sd")
    assert resolve_weights_dir({"MODEL_WEIGHTS": str(directory)}) == directory


def test_model_weights_pointing_nowhere_says_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="MODEL_WEIGHTS=.*is not a diffusers pipeline directory"):
        resolve_weights_dir({"MODEL_WEIGHTS": str(tmp_path)})


def test_downloaded_weights_win_over_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", pipeline_dir(tmp_path / "weights"))
    assert resolve_weights_dir({}) == tmp_path / "weights"


def test_without_downloaded_weights_the_bundled_model_is_served(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights")
    assert resolve_weights_dir({}) == weights.BUNDLED_MODEL_DIR
    assert inspect_weights(weights.BUNDLED_MODEL_DIR).name == "shapes-sd"


def test_a_download_interrupted_before_model_index_is_not_replaced_by_the_bundled_model(
    tmp_path, monkeypatch
):
    partial = tmp_path / "weights"
    partial.mkdir()
    source = {"model_id": "org/sd-model", "revision": "0" * 40, "variant": None, "complete": False}
    (partial / SOURCE_FILE).write_text(json.dumps(source))
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", partial)
    with pytest.raises(WeightsError) as error:
        resolve_weights_dir({})
    message = str(error.value)
    assert f"{partial / 'model_index.json'} is missing" in message
    assert "`script/download-weights org/sd-model` to finish it" in message


def test_no_weights_at_all_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(weights, "BUNDLED_MODEL_DIR", tmp_path / "models" / "shapes-sd")
    with pytest.raises(WeightsError) as error:
        resolve_weights_dir({})
    message = str(error.value)
    assert "script/download-weights stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "script/train-bundled-model" in message and "MODEL_WEIGHTS" in message


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
            hub.source_while_downloading = json.loads((local_dir / weights.SOURCE_FILE).read_text())

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
    assert hub.source_while_downloading["complete"] is False
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
