"""The training script's mechanics: a few steps produce a pipeline the engine loads and runs."""

from sdcog.engine import Engine
from sdcog.request import resolve_request
from sdcog.training import train


def test_a_short_training_run_saves_a_loadable_model_with_its_curve(tmp_path):
    out = train(tmp_path / "model", vae_steps=2, unet_steps=2, seed=0)
    assert {"model_index.json", "README.md", "training_curve.json"} <= {path.name for path in out.iterdir()}
    engine = Engine.load(out)
    assert (engine.limits.native_width, engine.limits.native_height) == (64, 64)
    [image] = engine.generate(
        resolve_request(
            engine.limits, prompt="a red circle on a blue background", seed=1, num_inference_steps=2
        )
    )
    assert image.size == (64, 64)
