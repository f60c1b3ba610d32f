"""The procedural world of the bundled model: coloured shapes on coloured backgrounds.

`render` draws one scene from a caption's parts; `judge` reads a generated image back
deterministically (background colour from the border, the object's colour from the pixels that
differ from it, its shape from how much of its bounding box it fills), so tests can measure how
often the model follows a prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        """One combination in five is never trained on, to measure prompt adherence on unseen prompts."""
        return hashlib.sha256(self.caption.encode()).digest()[0] % 5 == 0


ALL_SCENES = tuple(
    Scene(colour, shape, background) for colour, background in permutations(COLOURS, 2) for shape in SHAPES
)
TRAIN_SCENES = tuple(scene for scene in ALL_SCENES if not scene.held_out)
HELD_OUT_SCENES = tuple(scene for scene in ALL_SCENES if scene.held_out)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene with a random object size and position (the object always fully inside)."""
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size * 3 // 8, size * 5 // 8)
    left = rng.randint(size // 16, size - extent - size // 16)
    top = rng.randint(size // 16, size - extent - size // 16)
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(left + extent / 2, top), (left + extent, top + extent), (left, top + extent)], fill=fill
        )
    return image


@dataclass(frozen=True)
class Judgement:
    colour: str | None
    shape: str | None
    background: str
    object_share: float
    """The share of the image the object covers."""

    def matches(self, scene: Scene) -> bool:
        return (self.colour, self.shape) == (scene.colour, scene.shape)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def judge(image: Image.Image, min_share: float = 0.03) -> Judgement:
    """Background, object colour and object shape of a generated image, by fixed rules."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    foreground = distance > 80
    share = float(foreground.mean())
    background = _nearest_colour(background_rgb)
    if share < min_share:
        return Judgement(None, None, background, share)
    colour = _nearest_colour(np.median(pixels[foreground], axis=0))
    rows, columns = np.nonzero(foreground)
    box_area = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    fill = foreground.sum() / box_area
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    return Judgement(colour, shape, background, share)
