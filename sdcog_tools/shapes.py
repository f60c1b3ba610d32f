"""The procedural world of the bundled model: coloured shapes on coloured backgrounds.

`render` draws one scene from a caption's parts; `judge` reads a generated image back
deterministically (background colour from the border, the object's colour from the pixels that
differ from it, its shape from the template that fits its outline best), so tests can measure how
often the model follows a prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

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
NEW_SHAPE = "bar"
"""A shape the bundled model never saw: what the fine-tuning oracle teaches it (under a trigger word).
A bar three times as wide as it is tall (every other shape fills a square box): at 64 px its
outline survives the VAE, where the arms of a cross come back as a rounded blob."""
BAR_ASPECT = 2.0
"""A region at least this many times wider than tall is a bar."""


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


Box = tuple[int, int, int, int]
"""An object's bounding box: left, top, right, bottom."""


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene with a random object size and position (the object always fully inside)."""
    return render_at(scene, random_box(rng, size), size)


def random_box(rng: random.Random, size: int = IMAGE_SIZE) -> Box:
    """A random square box for the object: 3/8 to 5/8 of the image wide, fully inside."""
    extent = rng.randint(size * 3 // 8, size * 5 // 8)
    left = rng.randint(size // 16, size - extent - size // 16)
    top = rng.randint(size // 16, size - extent - size // 16)
    return (left, top, left + extent, top + extent)


def render_at(scene: Scene, box: Box, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene with its object drawn in `box`."""
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    _draw_shape(ImageDraw.Draw(image), scene.shape, box, COLOURS[scene.colour])
    return image


def silhouette(shape: str, box: Box, size: int = IMAGE_SIZE) -> Image.Image:
    """Where a shape is: white where it is drawn in `box`, black elsewhere (RGB, as control images are)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    _draw_shape(ImageDraw.Draw(image), shape, box, (255, 255, 255))
    return image


def box_held_out(box: Box) -> bool:
    """One box in five (by position and size) is never trained on by the shapes ControlNet, to
    measure its control on positions it never saw."""
    return hashlib.sha256(repr(box).encode()).digest()[0] % 5 == 0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == NEW_SHAPE:  # the middle third of the box, across its width
        third = (bottom - top) / 3
        draw.rectangle((left, top + third, right, bottom - third), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


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
    return list(COLOURS)[int(nearest_colours(rgb))]


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """The index into COLOURS of the nearest palette colour, for each RGB pixel of an (..., 3) array."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distances = ((np.asarray(pixels, dtype=np.float32)[..., None, :] - palette) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def background_and_foreground(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The background colour (the median of the border pixels) and the mask of the pixels that
    differ from it clearly (by over 80 in RGB distance): the object."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    return background_rgb, distance > 80


def object_region(image: Image.Image) -> np.ndarray:
    """The drawn object's pixels (the largest region that differs from the background), as
    `judge` finds them."""
    return _largest_region(background_and_foreground(image)[1])


def overlap(image: Image.Image, requested: Image.Image) -> float:
    """How well the drawn object covers the requested region (white in `requested`): their IoU."""
    drawn = object_region(image)
    wanted = np.asarray(requested.convert("L")) > 127
    union = (drawn | wanted).sum()
    return float((drawn & wanted).sum() / union) if union else 0.0


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _closest_shape(region: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str:
    """The shape whose outline, drawn into the region's bounding box, overlaps it best (by IoU)."""
    rows, columns = np.nonzero(region)
    box = (int(columns.min()), int(rows.min()), int(columns.max()), int(rows.max()))
    if NEW_SHAPE in shapes and (box[2] - box[0] + 1) >= BAR_ASPECT * (box[3] - box[1] + 1):
        return NEW_SHAPE
    overlaps = {}
    for shape in shapes:
        template = Image.new("1", (region.shape[1], region.shape[0]), 0)
        _draw_shape(ImageDraw.Draw(template), shape, box, 1)
        drawn = np.asarray(template)
        overlaps[shape] = (drawn & region).sum() / (drawn | region).sum()
    return max(overlaps, key=overlaps.get)


def judge(image: Image.Image, min_share: float = 0.03, shapes: tuple[str, ...] = SHAPES) -> Judgement:
    """Background, object colour and object shape of a generated image, by fixed rules: the
    object is the largest connected region that differs from the background; its colour is its
    median pixel's nearest palette colour; its shape, the template of `shapes` that fits its
    outline best (add NEW_SHAPE to recognise it)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background_rgb, foreground = background_and_foreground(image)
    region = _largest_region(foreground)
    share = float(region.mean())
    background = _nearest_colour(background_rgb)
    if share < min_share:
        return Judgement(None, None, background, share)
    colour = _nearest_colour(np.median(pixels[region], axis=0))
    return Judgement(colour, _closest_shape(region, shapes), background, share)
