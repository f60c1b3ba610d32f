"""script/predict: `cog predict` without Docker, through the real server."""

import pytest
from PIL import Image

from sdcog.model.weights import DEFAULT_WEIGHTS_DIR
from sdcog.write.outputs import read_infotext
from sdcog_tools import predict_cli
from sdcog_tools.shapes import judge

PROPERTIES = {
    "prompt": {"type": "string"},
    "seed": {"type": "integer"},
    "guidance_scale": {"type": "number"},
    "flag": {"type": "boolean"},
    "image": {"type": "string", "format": "uri"},
}


def test_inputs_are_typed_by_the_schema(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    inputs = predict_cli.parse_inputs(
        ["prompt=a cat, 4k", "seed=7", "guidance_scale=7.5", "flag=true", f"image=@{photo}"], PROPERTIES
    )
    assert inputs["prompt"] == "a cat, 4k" and inputs["seed"] == 7 and inputs["guidance_scale"] == 7.5
    assert inputs["flag"] is True and inputs["image"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("seed=abc", "seed must be an integer"),
        ("colour=red", "unknown input 'colour'"),
        ("seed", "name=value"),
    ],
)
def test_bad_arguments_are_explained(pair, message):
    with pytest.raises(predict_cli.UsageError, match=message):
        predict_cli.parse_inputs([pair], PROPERTIES)


def test_one_prediction_end_to_end_writes_the_images(tiny_sd15, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_WEIGHTS", str(tiny_sd15))
    arguments = ["-i", "prompt=a blue square", "-i", "seed=3", "-i", "num_outputs=2", "-i", "width=64"]
    arguments += [
        "-i",
        "height=64",
        "-i",
        "num_inference_steps=2",
        "-i",
        "output_format=png",
        "-o",
        str(tmp_path),
    ]
    assert predict_cli.main(arguments) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "output.0.png"), str(tmp_path / "output.1.png")]
    assert "Seed: 4" in read_infotext(tmp_path / "output.1.png")


def test_a_refused_prediction_exits_non_zero_with_the_reason(tiny_sd15, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_WEIGHTS", str(tiny_sd15))
    assert predict_cli.main(["-i", "width=100", "-i", "height=64", "-o", str(tmp_path)]) == 1
    assert "width: must be a multiple of 8" in capsys.readouterr().err


@pytest.mark.skipif(
    (DEFAULT_WEIGHTS_DIR / "model_index.json").is_file(), reason="weights/ holds a model, which wins"
)
def test_the_readme_quick_start_draws_the_prompt_with_the_bundled_model(tmp_path, monkeypatch, capsys):
    # README: script/predict -i prompt="a red circle on a blue background" -i seed=1
    monkeypatch.delenv("MODEL_WEIGHTS", raising=False)
    arguments = ["-i", "prompt=a red circle on a blue background", "-i", "seed=1", "-o", str(tmp_path)]
    assert predict_cli.main(arguments) == 0
    [written] = capsys.readouterr().out.split()
    with Image.open(written) as image:
        assert image.format == "WEBP" and image.size == (64, 64)
        seen = judge(image)
    assert (seen.colour, seen.shape, seen.background) == ("red", "circle", "blue")
    assert "Model: shapes-sd" in read_infotext(written)
