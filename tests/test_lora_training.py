"""Training a LoRA (issue 19, the training loop): deterministic for a seed on the CPU, leaves the
pipeline as it found it, and gives a file diffusers loads that changes the images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sdcog.train.dataset import TrainingImage
from sdcog.train.lora_training import LoraSettings, train_lora

SETTINGS = LoraSettings(max_train_steps=4, learning_rate=1e-2, lora_rank=4, train_batch_size=2, seed=3)


def training_images(size: int) -> list[TrainingImage]:
    rng = np.random.default_rng(0)
    return [
        TrainingImage(
            f"{index}.png",
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
            f"a photo of TOK {index}",
            "test",
        )
        for index in range(3)
    ]


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def pipeline(request, tiny_pipelines):
    return DiffusionPipeline.from_pretrained(tiny_pipelines[request.param], local_files_only=True)


def image(pipeline) -> np.ndarray:
    generated = pipeline(
        "a photo of TOK",
        num_inference_steps=2,
        width=64,
        height=64,
        output_type="np",
        generator=torch.Generator().manual_seed(1),
    )
    return generated.images[0]


def test_the_same_seed_gives_the_same_lora_and_the_pipeline_is_left_as_it_was(pipeline):
    before = image(pipeline)
    first = train_lora(pipeline, training_images(64), SETTINGS)
    second = train_lora(pipeline, training_images(64), SETTINGS)
    assert len(first.losses) == 4 and all(np.isfinite(first.losses))
    assert first.unet_layers.keys() == second.unet_layers.keys() and first.unet_layers
    assert all(torch.equal(first.unet_layers[name], second.unet_layers[name]) for name in first.unet_layers)
    assert first.losses == second.losses
    assert np.array_equal(image(pipeline), before)  # no adapter left on the UNet
    other = train_lora(pipeline, training_images(64), LoraSettings(**{**SETTINGS.__dict__, "seed": 4}))
    assert any(
        not torch.equal(first.unet_layers[name], other.unet_layers[name]) for name in first.unet_layers
    )


def test_the_trained_lora_saved_in_diffusers_format_loads_and_changes_the_images(pipeline, tmp_path):
    trained = train_lora(pipeline, training_images(64), SETTINGS)
    type(pipeline).save_lora_weights(tmp_path, unet_lora_layers=trained.unet_layers, safe_serialization=True)
    before = image(pipeline)
    pipeline.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors", adapter_name="trained")
    try:
        assert np.abs(image(pipeline) - before).max() > 0.01
    finally:
        pipeline.delete_adapters("trained")
    assert np.array_equal(image(pipeline), before)


def test_pivotal_tuning_is_deterministic_too_and_leaves_the_embedding_slots_empty(pipeline):
    settings = LoraSettings(**{**SETTINGS.__dict__, "pivotal_tokens": 2, "ti_learning_rate": 0.1})
    before = image(pipeline)
    first = train_lora(pipeline, training_images(64), settings)
    second = train_lora(pipeline, training_images(64), settings)
    encoders = 2 if getattr(pipeline, "text_encoder_2", None) is not None else 1
    assert len(first.embeddings) == encoders and all(len(vectors) == 2 for vectors in first.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(first.embeddings, second.embeddings, strict=True))
    assert all(torch.equal(first.unet_layers[name], second.unet_layers[name]) for name in first.unet_layers)
    assert np.array_equal(image(pipeline), before)  # the slots are zeros again, the encoders unchanged
