"""The Cog training surface (`cog train`, the container's /trainings): typed inputs -> one training
-> trained_model.tar. No training logic lives here; see `sdcog.train`. As in predict.py, the
`Input` declarations use literal values because `cog build` reads them statically.
"""

import logging
import sys

from cog import BaseModel, Input, Path

from sdcog.fetch.input_files import guard_cog_downloads
from sdcog.model.weights import resolve_weights_dir
from sdcog.train.trainer import TrainingInputs, train_in_background

# Cog then hands a URL or data URI over undownloaded: sdcog fetches it under its own limits.
guard_cog_downloads()


class TrainingOutput(BaseModel):
    weights: Path


async def train(
    input_images: Path = Input(
        description="A zip or tar of the images to learn from (5-20 are typical; PNG, JPEG, WEBP, GIF, BMP or TIFF), recognised by its content, whatever its name. Captions: one .txt beside each image, or a caption.csv (caption,image_file); otherwise caption_prefix + trigger_word. Images are EXIF-rotated, centre-cropped and resized to resolution.",  # noqa: E501
    ),
    trigger_word: str = Input(
        description="The word that stands for what the images show: write it in prompts (a photo of TOK).",
        default="TOK",
    ),
    caption_prefix: str = Input(
        description="The caption of an image without its own, before the trigger word.",
        default="a photo of ",
    ),
    max_train_steps: int = Input(description="Training steps.", default=1000, ge=1, le=10000),
    learning_rate: float = Input(description="The LoRA's learning rate.", default=1e-4, ge=1e-7, le=1e-1),
    ti_learning_rate: float = Input(
        description="The learning rate of the trigger word's embeddings (pivotal tuning).",
        default=3e-4,
        ge=1e-7,
        le=1,
    ),
    lora_rank: int = Input(
        description="The LoRA's rank: larger learns more detail and makes a larger file.",
        default=32,
        ge=1,
        le=128,
    ),
    resolution: int | None = Input(
        description="Side of the square training images, a multiple of 8. Default: the model's native size (768 for SDXL).",  # noqa: E501
        default=None,
        ge=64,
        le=1024,
    ),
    train_batch_size: int = Input(description="Images per step.", default=4, ge=1, le=16),
    seed: int | None = Input(
        description="Random seed: the same seed, images and inputs train the same LoRA. Blank: a random one (logged, and recorded in the tar).",  # noqa: E501
        default=None,
        ge=0,
        le=4294967295,
    ),
    pivotal_tuning: bool = Input(
        description="Also train 2 new token embeddings that the trigger word stands for (textual inversion alongside the LoRA): learns new subjects faster and keeps them out of prompts without the word.",  # noqa: E501
        default=True,
    ),
) -> TrainingOutput:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    inputs = TrainingInputs(
        trigger_word=trigger_word,
        caption_prefix=caption_prefix,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        ti_learning_rate=ti_learning_rate,
        lora_rank=lora_rank,
        resolution=resolution,
        train_batch_size=train_batch_size,
        seed=seed,
        pivotal_tuning=pivotal_tuning,
    )
    return TrainingOutput(
        weights=Path(await train_in_background(input_images, inputs, resolve_weights_dir()))
    )
