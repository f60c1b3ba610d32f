"""Running out of GPU memory fails that prediction with advice, frees the cache, and the next one works.

There is no GPU here, so the UNet raises the very exception CUDA raises (torch.OutOfMemoryError)
on its first call; everything around it (the engine, predict.py) is the real code.
"""

import asyncio

import numpy as np
import pytest
import torch

from sdcog.generate.engine import Engine, OutOfMemory
from sdcog.resolve.request import resolve_request

REQUEST = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 2}


@pytest.fixture
def engine(tiny_sd15):
    return Engine.load(tiny_sd15)


def fail_once_with_out_of_memory(monkeypatch, module):
    real_forward = module.forward
    calls = {"count": 0}

    def forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


def test_out_of_memory_suggests_a_smaller_request_and_the_next_prediction_works(engine, monkeypatch):
    request = resolve_request(engine.limits, **REQUEST, num_outputs=2)
    expected = [np.asarray(image) for image in engine.generate(request).images]
    freed = []
    monkeypatch.setattr("sdcog.generate.engine.free_accelerator_memory", lambda: freed.append(True))
    fail_once_with_out_of_memory(monkeypatch, engine.pipeline.unet)

    with pytest.raises(OutOfMemory) as raised:
        engine.generate(request)
    message = str(raised.value)
    assert message.startswith("out of GPU memory generating 2 image(s) of 64x64 with 3 steps")
    assert "smaller width and height, or fewer num_outputs" in message
    assert freed == [True]

    again = engine.generate(request)  # same request, same pixels: nothing was left half-changed
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(again.images, expected, strict=True))


def test_through_predict_the_prediction_fails_with_the_advice(tiny_sd15, monkeypatch, tmp_path):
    """predict.py as Cog calls it: the error reaches the caller as the prediction's failure."""
    monkeypatch.setenv("MODEL_WEIGHTS", str(tiny_sd15))
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    inputs = {**REQUEST, "num_outputs": 1}
    fail_once_with_out_of_memory(monkeypatch, predictor.engine.pipeline.unet)
    with pytest.raises(OutOfMemory, match="fewer num_outputs"):
        call_predict(predictor, **inputs)
    [path] = call_predict(predictor, **inputs)
    assert path.is_file()


def call_predict(predictor, **inputs):
    """predict() with every omitted input at its declared default (Cog passes FieldInfo otherwise)."""
    import inspect

    defaults = {
        name: parameter.default.default
        for name, parameter in inspect.signature(predictor.predict).parameters.items()
    }
    return asyncio.run(predictor.predict(**{**defaults, **inputs}))
