"""Input images and masks: reading, sizing, the outpainting canvas, and pasting kept pixels back.

Masks follow diffusers and AUTOMATIC1111: white repaints, black keeps. A mask is binarised at
half grey; after generation every pixel the mask keeps is copied back from the input, so
inpainting never changes what the user kept. The seam is blended *inside* the repainted area only:
the blend weight rises from 0 at the mask's edge to 1 over MASK_BLUR_PX pixels, which hides the
edge without touching a single kept pixel.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFilter, UnidentifiedImageError

from sdcog.errors import InputError
from sdcog.fetch.image_structure import check_exif, check_structure

MASK_BLUR_PX = 4
MAX_INPUT_PIXELS = 50_000_000
"""Larger input images are refused before decoding (an 8K photo is 33 megapixels)."""
SIZE_MULTIPLE = 8
_EDGE_FILL_BLUR_PX = 16


ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats read (Pillow's names; JPEG includes MPO, PNG includes APNG). Pillow opens each of
these from its header alone, so the pixel limit is checked before anything is decoded. Every
other format is refused: Pillow decodes an ICO file's whole image inside Image.open() (and an
ICNS file's when loading, whatever size its header claims), renders EPS with Ghostscript, and
reads dozens of formats nobody sends as a photo or a mask."""
_ACCEPTED_TEXT = "PNG, JPEG, WEBP, GIF, BMP or TIFF"
_OTHER_SIGNATURES = ((0, b"%PDF", "PDF"), (4, b"ftypheic", "HEIC"), (4, b"ftypmif1", "HEIF"))
"""Formats Pillow does not read at all, named in the refusal when recognised."""
_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)
_INTEGER_RAWMODE = re.compile(r"I;(?P<bits>\d+)[BLNR]?(?P<signed>S?)")
_TIFF_PHOTOMETRIC, _TIFF_SAMPLE_FORMAT = 262, 339
"""TIFF tags: PhotometricInterpretation 0 (WhiteIsZero) makes 0 white; SampleFormat 2 is signed."""
_ROWS_BUDGET = 1 << 20
"""Pixels converted at a time from 16-bit, 32-bit and float images, to bound the memory it takes."""


def open_image(field: str, data: bytes) -> Image.Image:
    """Decode an uploaded file as an 8-bit image (EXIF orientation applied), or refuse it naming
    `field`.

    Only ACCEPTED_FORMATS are opened, and the size in the file's header is checked before any
    pixel is decoded, so a small file that claims a huge image (a decompression bomb) costs
    nothing. Its structure (chunks, segments, scans, blocks, strips) is counted first too, so a
    file stuffed with millions of them is refused as cheaply (see sdcog.fetch.image_structure). A file
    with several frames (GIF, APNG, WebP, MPO, multi-page TIFF) gives its first. The result is
    "L", "LA", "RGB" or "RGBA", whatever the file held (see `to_8_bit`).
    """
    try:
        check_structure(field, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except InputError:
        raise
    except UnidentifiedImageError as error:
        name = _format_name(data)
        if name is not None:
            raise InputError(
                field, f"is in a format not read here ({name}?): send {_ACCEPTED_TEXT}"
            ) from error
        raise InputError(field, f"is not a readable image file (send {_ACCEPTED_TEXT})") from error
    except Image.DecompressionBombError as error:
        raise InputError(
            field,
            f"is over {2 * (Image.MAX_IMAGE_PIXELS or 0) // 1_000_000} megapixels; the limit is "
            f"{MAX_INPUT_PIXELS // 1_000_000} megapixels (scale it down first)",
        ) from error
    except _READ_ERRORS as error:
        raise _unreadable(field, error) from error
    with image:
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InputError(
                field,
                f"is {image.width}x{image.height} pixels; the limit is "
                f"{MAX_INPUT_PIXELS // 1_000_000} megapixels (scale it down first)",
            )
        rawmode = _rawmode(image)  # how the file stores its pixels; load() forgets it
        white_is_zero = _tiff_tag(image, _TIFF_PHOTOMETRIC) == 0
        signed_8_bit = image.mode == "L" and _tiff_tag(image, _TIFF_SAMPLE_FORMAT) == 2
        try:
            image.load()
            check_exif(field, image.info)  # before getexif parses it
            image = _upright(image)
        except InputError:
            raise
        except (*_READ_ERRORS, AttributeError, TypeError, KeyError, IndexError) as error:
            raise _unreadable(field, error) from error  # metadata Pillow's own parser chokes on
    if signed_8_bit:  # Pillow reads int8 as uint8
        image, rawmode = Image.fromarray(np.asarray(image).view(np.int8).astype(np.int32)), "I;8S"
    return to_8_bit(field, image, rawmode, white_is_zero)


_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)."""


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Unlike ImageOps.exif_transpose, nothing of
    the EXIF is rewritten (no output keeps it): Pillow's rewrite raised AttributeError on some
    malformed GPS and Interop tags."""
    method = _UPRIGHT.get(image.getexif().get(_EXIF_ORIENTATION))
    return image if method is None else image.transpose(method)


def _tiff_tag(image: Image.Image, tag: int) -> object:
    """The (first) value of a TIFF tag of the image; None if it has none or is no TIFF."""
    tags = getattr(image, "tag_v2", None)
    value = tags.get(tag) if tags is not None else None
    return value[0] if isinstance(value, tuple) and value else value


def _unreadable(field: str, error: Exception) -> InputError:
    return InputError(field, f"is not a readable image file ({type(error).__name__}: {error})")


def _format_name(data: bytes) -> str | None:
    """The name of the format `data` is in, among those Pillow knows but this server does not read."""
    for offset, signature, name in _OTHER_SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    if b"<svg" in data[:4096].lower():
        return "SVG"
    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        if name in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            recognised = accept(prefix)
        except Exception:  # a plugin's check choking on a short prefix names nothing
            continue
        if recognised and not isinstance(recognised, str):  # a str explains why it is not
            return name
    return None


def _rawmode(image: Image.Image) -> str | None:
    """The raw mode of the image's first tile ("I;16B", "I;32S", "F;32F"...), before it is loaded."""
    tile = getattr(image, "tile", None)
    if not tile:
        return None
    args = tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) else None


def to_8_bit(
    field: str, image: Image.Image, rawmode: str | None = None, white_is_zero: bool = False
) -> Image.Image:
    """A new image (one frame, detached from the file) in mode "L", "LA", "RGB" or "RGBA", each
    mode converted by its real range, or InputError naming `field` for pixels of unknown range.

    16-bit, 32-bit and float images are scaled, not clipped: white is the largest value of the
    file's type (65535, 4095 for 12-bit TIFFs; `rawmode`, the file's own layout such as "I;16B"
    or "I;32S", tells which), 1.0 for floats; negative values are black. This is scikit-image's
    img_as_ubyte convention (which refuses floats outside -1..1; they are clipped here). A
    16-bit RGB(A) PNG or TIFF arrives as 8-bit RGB(A): Pillow keeps each sample's high byte.
    `white_is_zero` (a TIFF's PhotometricInterpretation 0) inverts them,
    which Pillow does itself for 1- to 8-bit images only. Transparency (alpha, a palette's or a
    tRNS colour) is kept as alpha, which `as_rgb` flattens onto white.
    """
    mode = image.mode
    transparent = image.info.get("transparency")
    if mode in ("LA", "RGBA") or (mode in ("L", "RGB") and transparent is None):
        return image.copy()
    if mode in ("L", "RGB"):  # with a tRNS colour
        return image.convert(mode + "A" if mode == "L" else "RGBA")
    if mode in ("P", "PA"):
        return image.convert("RGBA" if mode == "PA" or transparent is not None else "RGB")
    if mode in ("La", "RGBa"):  # alpha premultiplied
        return image.convert(mode.upper())
    if mode in ("CMYK", "YCbCr", "HSV", "RGBX"):
        return image.convert("RGB")
    if mode == "LAB":
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    black_white = _black_and_white(mode, rawmode)
    if black_white is None:
        raise InputError(field, f"has {mode} pixels stored as {rawmode}, which are not read here")
    unsigned32 = mode == "I" and black_white[1] > np.iinfo(np.int32).max
    if white_is_zero and mode != "1":
        black_white = black_white[::-1]
    grey, alpha = _scaled(
        image, *black_white, unsigned32, transparent if isinstance(transparent, int) else None
    )
    result = Image.fromarray(grey, "L")
    if alpha is not None:
        result.putalpha(Image.fromarray(alpha, "L"))
    return result


def _black_and_white(mode: str, rawmode: str | None) -> tuple[float, float] | None:
    """The values that read as black and as white in a "1", 16-bit, 32-bit or float image."""
    if mode == "1":
        return 0, 1
    if mode == "F":
        return 0.0, 1.0
    if mode.startswith("I"):
        match = _INTEGER_RAWMODE.fullmatch(rawmode or "")
        if match is not None:
            bits = int(match["bits"])
            return 0, 2 ** (bits - 1) - 1 if match["signed"] else 2**bits - 1
        if mode.startswith("I;16"):
            return 0, 65535
    return None


def _scaled(
    image: Image.Image, black: float, white: float, unsigned32: bool, transparent: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image's values from black..white to 0..255 (rounded; outside values clipped, NaN
    black), and the alpha a tRNS value makes (None without one), as uint8 arrays. Converted a
    band of rows at a time, so the memory it takes beyond the result stays small."""
    width, height = image.size
    grey = np.empty((height, width), np.uint8)
    alpha = None if transparent is None else np.empty((height, width), np.uint8)
    rows = max(1, _ROWS_BUDGET // max(1, width))
    for top in range(0, height, rows):
        values = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if unsigned32:
            values = values.view(np.uint32)  # Pillow keeps unsigned 32-bit values in a signed int
        if alpha is not None:
            alpha[top : top + rows] = np.where(values == transparent, 0, 255)
        band = (values.astype(np.float64) - black) * (255.0 / (white - black))
        np.clip(band, 0, 255, out=band)
        grey[top : top + rows] = np.rint(np.nan_to_num(band, copy=False, nan=0.0))
    return grey, alpha


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
