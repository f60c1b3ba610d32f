"""Input images and masks: reading, sizing, the outpainting canvas, and pasting kept pixels back.

Masks follow diffusers and AUTOMATIC1111: white repaints, black keeps. A mask is binarised at
half grey; after generation every pixel the mask keeps is copied back from the input, so
inpainting never changes what the user kept. The seam is blended *inside* the repainted area only:
the blend weight rises from 0 at the mask's edge to 1 over MASK_BLUR_PX pixels, which hides the
edge without touching a single kept pixel.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdcog.errors import InputError

MASK_BLUR_PX = 4
MAX_INPUT_PIXELS = 50_000_000
"""Larger input images are refused before decoding (an 8K photo is 33 megapixels)."""
SIZE_MULTIPLE = 8
_EDGE_FILL_BLUR_PX = 16


def open_image(field: str, data: bytes) -> Image.Image:
    """Decode an uploaded file as an image (EXIF orientation applied), or refuse it naming `field`.

    The size in the file's header is checked before any pixel is decoded, so a small file that
    claims a huge image (a decompression bomb) costs nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            image = Image.open(io.BytesIO(data))
        with image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InputError(
                    field,
                    f"is {image.width}x{image.height} pixels; the limit is "
                    f"{MAX_INPUT_PIXELS // 1_000_000} megapixels (scale it down first)",
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(field, f"is not a readable image file ({type(error).__name__}: {error})") from error
    return upright


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency flattened onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as pure black/white ("L") at `size`; refused if it repaints nothing."""
    grey = mask.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    binary = grey.point(lambda value: 255 if value >= 128 else 0)
    if binary.getbbox() is None:
        raise InputError("mask", "is all black, so nothing would be repainted (white areas are repainted)")
    return binary


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """The nearest multiple (halves round up), at least `multiple`."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


@dataclass(frozen=True)
class Outpaint:
    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0

    @property
    def amounts(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right, self.bottom)

    def __bool__(self) -> bool:
        return any(self.amounts)

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The extended size, its extra pixels to multiples of 8 added on the right and bottom."""
        width, height = size
        return (
            -(-(width + self.left + self.right) // SIZE_MULTIPLE) * SIZE_MULTIPLE,
            -(-(height + self.top + self.bottom) // SIZE_MULTIPLE) * SIZE_MULTIPLE,
        )

    def describe(self) -> str:
        return f"left={self.left} top={self.top} right={self.right} bottom={self.bottom}"


def extend_canvas(
    image: Image.Image, mask: Image.Image | None, outpaint: Outpaint
) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas and the mask that repaints the new area (plus `mask`'s own).

    The new area starts as the image's edges stretched outwards and blurred, so the model
    continues the picture's colours rather than starting from a flat fill.
    """
    canvas_size = outpaint.canvas_size(image.size)
    offset = (outpaint.left, outpaint.top)
    pixels = np.asarray(image)
    pad_right = canvas_size[0] - image.width - outpaint.left
    pad_bottom = canvas_size[1] - image.height - outpaint.top
    stretched = np.pad(pixels, ((outpaint.top, pad_bottom), (outpaint.left, pad_right), (0, 0)), mode="edge")
    canvas = Image.fromarray(stretched).filter(ImageFilter.GaussianBlur(_EDGE_FILL_BLUR_PX))
    canvas.paste(image, offset)
    canvas_mask = Image.new("L", canvas_size, 255)
    canvas_mask.paste(mask if mask is not None else Image.new("L", image.size, 0), offset)
    return canvas, canvas_mask


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` where the mask repaints (feathered inwards), `original` exactly everywhere else."""
    keep = np.asarray(mask) == 0
    feathered = np.asarray(mask.filter(ImageFilter.GaussianBlur(MASK_BLUR_PX)), dtype=np.float32) / 255.0
    # Inside the repainted area the weight ramps from ~0.5 at the edge to 1; make it start at 0.
    weight = np.clip((feathered - 0.5) * 2.0, 0.0, 1.0)
    weight[keep] = 0.0
    weight = weight[..., None]
    blended = (
        np.asarray(original, dtype=np.float32) * (1 - weight)
        + np.asarray(generated, dtype=np.float32) * weight
    )
    result = np.rint(blended).astype(np.uint8)
    result[keep] = np.asarray(original)[keep]
    return Image.fromarray(result)
