"""Where weights are found (and what the message says to run when there are none). The checks of a
directory's contents are in tests/test_weights_check.py; what a download fetches (against a hub on
127.0.0.1) in tests/test_download_weights.py."""

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
