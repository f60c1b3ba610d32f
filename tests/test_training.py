"""The training script's mechanics: a short run saves a loadable model, bit-reproducibly."""

import dataclasses
import json

from safetensors.torch import load_file

from sdcog.generate.engine import Engine
from sdcog.resolve.request import resolve_request
from sdcog_tools.training import Recipe, train

SHORT = Recipe(vae_steps=3, unet_steps=3, latent_pool=64, vae_batch=4, unet_batch=4)


def test_a_short_training_run_saves_a_loadable_model_with_its_curve_and_card(tmp_path):
    out = train(SHORT, tmp_path / "model", measure=False)
    assert {"model_index.json", "README.md", "training_curve.json"} <= {path.name for path in out.iterdir()}
    curve = json.loads((out / "training_curve.json").read_text())
    assert [point["phase"] for point in curve] == ["vae", "unet"]
    assert "unet_steps 3" in (out / "README.md").read_text()
    engine = Engine.load(out)
    assert (engine.limits.native_width, engine.limits.native_height) == (64, 64)
    [image] = engine.generate(
        resolve_request(
            engine.limits, prompt="a red circle on a blue background", seed=1, num_inference_steps=2
        )
    ).images
    assert image.size == (64, 64)


def test_the_same_recipe_gives_the_same_weights_bit_for_bit(tmp_path):
    first, second = (train(SHORT, tmp_path / name, measure=False) for name in ("first", "second"))
    for component in ("unet", "text_encoder", "vae"):
        [weights] = (first / component).glob("*.safetensors")
        a, b = load_file(weights), load_file(second / component / weights.name)
        assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)
    other = train(dataclasses.replace(SHORT, seed=1), tmp_path / "other", measure=False)
    [weights] = (first / "unet").glob("*.safetensors")
    assert not load_file(weights)["conv_in.weight"].equal(
        load_file(other / "unet" / weights.name)["conv_in.weight"]
    )
