"""Image files users might send as `image` or `mask`, hostile or merely unusual, built as bytes.

Each builder's docstring says what the server must answer. "Refused" always means an InputError
naming the field (`image: ...` or `mask: ...`), never a 5xx; a file over the pixel limit or in a
format not read is refused before any pixel is decoded, and the latter's message lists the
formats the server reads (sdcog.images.ACCEPTED_FORMATS: PNG, JPEG, WEBP, GIF, BMP, TIFF).
Use them from another test module as `from hostile_images import ...` (tests/ is on sys.path).

The PNG and TIFF writers are written by hand (not with Pillow), so the files hold exactly what
their headers claim, whatever the installed Pillow can or cannot write.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

from PIL import Image

# -- PNG, by hand ----------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _pack_samples(samples: Sequence[int], bits: int) -> bytes:
    """Unsigned samples packed most significant bit first, the row padded to a whole byte."""
    if bits % 8 == 0:
        return b"".join(value.to_bytes(bits // 8, "big") for value in samples)
    number = 0
    for value in samples:
        number = (number << bits) | value
    padding = -len(samples) * bits % 8
    return (number << padding).to_bytes((len(samples) * bits + padding) // 8, "big")


def png(
    width: int,
    height: int,
    pixel: Sequence[int] = (0,),
    *,
    bit_depth: int = 8,
    colour_type: int = 0,
    extra_chunks: Sequence[tuple[bytes, bytes]] = (),
    right_pixel: Sequence[int] | None = None,
) -> bytes:
    """A PNG of `width` x `height` pixels, every pixel `pixel` (one value per sample; the right
    half `right_pixel` if given), compressed row by row so that a huge one costs little memory to
    build. `extra_chunks` (PLTE, tRNS...) go before IDAT. Must be accepted up to 50 megapixels and
    read as its samples scaled to 8 bits (sample / (2**bit_depth - 1) * 255); over 50 megapixels,
    refused from the header."""
    assert len(pixel) == _PNG_CHANNELS[colour_type]
    right = list(right_pixel or pixel)
    row = b"\x00" + _pack_samples(list(pixel) * (width // 2) + right * (width - width // 2), bit_depth)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header), *(_chunk(kind, data) for kind, data in extra_chunks)]
    return PNG_SIGNATURE + b"".join(chunks) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` 8-bit grey pixels, with one empty IDAT: a few
    dozen bytes. Over 50 megapixels the server must refuse it from the header, in milliseconds."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")


def grey16_png(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit greyscale PNG, every pixel `value` (0-65535). Must be accepted and read as 8-bit
    grey round(value / 257): 32768 is 128 (mid grey, not white); as a mask, 1000 is black (kept)
    and 60000 white (repainted)."""
    return png(*size, (value,), bit_depth=16, colour_type=0)


def grey16_mask_png(left: int, right: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit greyscale mask PNG, its left half `left` and its right half `right` (0-65535).
    Must be accepted; the mask is binarised at half grey of the 16-bit range: 1000 keeps (black),
    32768 and 60000 repaint (white). All below 32768 is refused as "all black"."""
    return png(*size, (left,), bit_depth=16, colour_type=0, right_pixel=(right,))


def grey16_png_with_transparency(value: int, transparent: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit greyscale PNG whose tRNS chunk makes grey `transparent` fully transparent. Must be
    accepted; where value == transparent it reads as white (transparency is flattened onto white)."""
    trns = (b"tRNS", struct.pack(">H", transparent))
    return png(*size, (value,), bit_depth=16, colour_type=0, extra_chunks=[trns])


def rgb16_png(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit-per-channel RGB PNG. Must be accepted and read as each channel / 257 (to within 1)."""
    return png(*size, rgb, bit_depth=16, colour_type=2)


def ico_bomb(side: int = 13_300) -> bytes:
    """An ICO file (the format of favicon.ico) wrapping a PNG of `side` x `side` black-and-white
    pixels: ~30 kB for 177 megapixels, just under the size at which Pillow's own bomb check
    raises. Pillow decodes an ICO's image inside Image.open(), so reading its size decodes it all
    (hundreds of MB). Must be refused naming the field (ICO is not an accepted format) in well
    under a second, without decoding it."""
    return ico_around(png(side, side, (0,), bit_depth=1, colour_type=0))


def ico_around(image: bytes, width: int = 0, height: int = 0) -> bytes:
    """An ICO file holding one image (PNG or BMP data); its directory claims `width` x `height`
    (0 means 256). Must be refused naming the field: ICO is not an accepted format."""
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(image), 6 + 16)
    return directory + entry + image


# -- small files whose headers claim a huge image, one per accepted format ------------------------


def _saved(format: str, size: tuple[int, int] = (32, 32), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=format, **options)
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 32x32 JPEG whose frame header (SOF0) claims `width` x `height` (at most 65535 each).
    Over 50 megapixels it must be refused from the header, in milliseconds."""
    data = bytearray(_saved("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims `width` x `height` (at most 65535 each) around a 32x32
    frame. Over 50 megapixels it must be refused from the header, in milliseconds."""
    data = bytearray(_saved("GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose header claims `width` x `height` over 32x32 pixels of data. Over 50 megapixels it
    must be refused from the header, in milliseconds."""
    data = bytearray(_saved("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """An animated WebP whose canvas (VP8X) claims `width` x `height` (at most 16777216 each) around
    two 32x32 frames; libwebp allocates (without touching) the whole canvas when it opens one.
    Over 50 megapixels it must be refused from the header, in milliseconds, without the RSS
    growing."""
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    vp8x = data.index(b"VP8X")
    data[vp8x + 12 : vp8x + 18] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """A TIFF whose header claims `width` x `height` over 8x8 pixels of data. Over 50 megapixels it
    must be refused from the header, in milliseconds."""
    return tiff(8, 8, (0,), claimed_size=(width, height))


CLAIMING = {
    "PNG": png_header_only,
    "JPEG": jpeg_claiming,
    "GIF": gif_claiming,
    "BMP": bmp_claiming,
    "WEBP": webp_claiming,
    "TIFF": tiff_claiming,
}
"""Per accepted format: (width, height) -> a small file whose header claims that size."""


# -- TIFF, by hand ---------------------------------------------------------------------------------

_TIFF_SHORT, _TIFF_LONG = 3, 4


def tiff(
    width: int,
    height: int,
    pixel: Sequence[float],
    *,
    bits: Sequence[int] = (8,),
    photometric: int = 1,
    sample_format: int = 1,
    fill_order: int = 1,
    extra_samples: Sequence[int] = (),
    colour_map: Sequence[int] = (),
    big_endian: bool = False,
    claimed_size: tuple[int, int] | None = None,
) -> bytes:
    """An uncompressed, single-strip TIFF, every pixel `pixel` (one value per sample, as stored:
    ints, or floats with sample_format=3). Covers every layout Pillow's TiffImagePlugin.OPEN_INFO
    maps to a mode (1/2/4/8/12/16/32-bit, signed, float, fill order 2, both byte orders...).
    `claimed_size` makes the header claim another size than the pixels written. Must be accepted
    up to 50 megapixels and read by the samples' range (tests/test_input_images.py checks every
    layout), except the few layouts Pillow cannot unpack (fill order 2 with 1-8-bit palette or
    WhiteIsZero grey), refused as unreadable."""
    order = ">" if big_endian else "<"
    samples = list(pixel) * width
    if all(bit % 8 == 0 for bit in bits):
        codes = {(8, 1): "B", (8, 2): "b", (16, 1): "H", (16, 2): "h", (32, 1): "I", (32, 2): "i"}
        codes |= {(32, 3): "f", (64, 3): "d"}
        layout = order + "".join(codes[bit, sample_format] for bit in bits) * width
        row = struct.pack(layout, *samples)
    else:  # bit-packed samples (1, 2, 4, 12 bits) are most significant bit first in either order
        row = _pack_samples([int(value) for value in samples], bits[0])
    data = row * height
    if fill_order == 2:
        data = data.translate(bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256)))

    data += b"\x00" * (len(data) % 2)  # the IFD that follows starts on a word boundary
    tags: list[tuple[int, int, Sequence[int]]] = [
        (256, _TIFF_LONG, [(claimed_size or (width, height))[0]]),
        (257, _TIFF_LONG, [(claimed_size or (width, height))[1]]),
        (258, _TIFF_SHORT, list(bits)),
        (259, _TIFF_SHORT, [1]),  # no compression
        (262, _TIFF_SHORT, [photometric]),
        (266, _TIFF_SHORT, [fill_order]),
        (273, _TIFF_LONG, [8]),  # the strip starts right after the 8-byte header
        (277, _TIFF_SHORT, [len(bits)]),
        (278, _TIFF_LONG, [height]),
        (279, _TIFF_LONG, [len(row) * height]),
        (284, _TIFF_SHORT, [1]),
    ]
    if colour_map:
        tags.append((320, _TIFF_SHORT, list(colour_map)))
    if photometric == 6:
        tags.append((530, _TIFF_SHORT, [1, 1]))  # YCbCr without subsampling
    if extra_samples:
        tags.append((338, _TIFF_SHORT, list(extra_samples)))
    if sample_format != 1:
        tags.append((339, _TIFF_SHORT, [sample_format] * len(bits)))
    tags.sort()

    ifd_offset = 8 + len(data)
    out_of_line_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, out_of_line = b"", b""
    for tag, kind, values in tags:
        packed = struct.pack(order + ("H" if kind == _TIFF_SHORT else "I") * len(values), *values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack(order + "I", out_of_line_offset + len(out_of_line))
            out_of_line += packed
        entries += struct.pack(order + "HHI", tag, kind, len(values)) + field
    header = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + struct.pack(order + "I", ifd_offset)
    ifd = struct.pack(order + "H", len(tags)) + entries + struct.pack(order + "I", 0)
    return header + data + ifd + out_of_line


def float_tiff(value: float, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 32-bit float greyscale TIFF, every pixel `value`. Must be accepted and read with 0.0-1.0
    as black to white (values outside clipped): 0.5 is 128, not black."""
    return tiff(*size, (value,), bits=(32,), sample_format=3)


def int16_signed_tiff(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A signed 16-bit greyscale TIFF. Must be accepted and read with 0-32767 as black to white
    (negative values black), as scikit-image's img_as_ubyte does: 16384 is 128."""
    return tiff(*size, (value,), bits=(16,), sample_format=2)


def int32_tiff(value: int, size: tuple[int, int] = (16, 16), signed: bool = False) -> bytes:
    """A 32-bit integer greyscale TIFF (unsigned by default). Must be accepted and read by its
    range: 0 to 2**32-1 unsigned, 0 to 2**31-1 signed (negative values black)."""
    return tiff(*size, (value,), bits=(32,), sample_format=2 if signed else 1)


def grey12_tiff(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 12-bit greyscale TIFF (scanners, medical images). Must be accepted and read with 0-4095
    as black to white: 2048 is 128."""
    return tiff(*size, (value,), bits=(12,))


def lab_tiff(lightness: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A CIELab TIFF, neutral (a* = b* = 0), L* = lightness / 255 * 100. Must be accepted and read
    as the sRGB grey of that lightness (L* 50 is about 119)."""
    return tiff(*size, (lightness, 0, 0), bits=(8, 8, 8), photometric=8)


# -- formats the server does not read --------------------------------------------------------------


def ico_file() -> bytes:
    """A plain 32x32 ICO (favicon). Must be refused naming the field: ICO is not accepted."""
    return _saved("ICO", sizes=[(32, 32)])


def icns_file() -> bytes:
    """A macOS ICNS icon (Pillow decodes ICNS images in open() too). Must be refused."""
    return _saved("ICNS", size=(16, 16))


def psd_file() -> bytes:
    """A Photoshop PSD header (1 channel, 8-bit grey, 64x64, raw data). Must be refused."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 64, 64, 8, 1)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: empty
    return header + sections + struct.pack(">H", 0) + b"\x80" * 64 * 64


def tga_file() -> bytes:
    """A Truevision TGA (no magic number: Pillow recognises it by trying). Must be refused."""
    return _saved("TGA")


def pcx_file() -> bytes:
    """A PCX image. Must be refused."""
    return _saved("PCX")


def eps_file(side: int = 100_000) -> bytes:
    """An EPS file whose bounding box claims `side` x `side` points. Pillow would render it with
    Ghostscript (running PostScript from the request). Must be refused without running anything."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n"
        + f"%%BoundingBox: 0 0 {side} {side}\n".encode()
        + b"%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
    )


def pdf_file() -> bytes:
    """A one-page PDF holding an image. Must be refused (Pillow writes PDFs but does not read them)."""
    return _saved("PDF")


def svg_file() -> bytes:
    """An SVG drawing (text, with an external reference). Must be refused: it is not read at all."""
    return (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100000" '
        b'height="100000"><image href="file:///etc/passwd"/></svg>\n'
    )


def ppm_file() -> bytes:
    """A binary PPM (Netpbm). Must be refused."""
    return _saved("PPM")


def jpeg2000_file() -> bytes:
    """A JPEG 2000 (.jp2) image. Must be refused."""
    return _saved("JPEG2000")


def dds_file() -> bytes:
    """A DirectDraw Surface texture. Must be refused."""
    return _saved("DDS")


def qoi_file() -> bytes:
    """A QOI image. Must be refused."""
    return _saved("QOI")


def sgi_file() -> bytes:
    """An SGI image. Must be refused."""
    return _saved("SGI")


REFUSED_FORMATS = {
    "ICO": ico_file,
    "ICNS": icns_file,
    "PSD": psd_file,
    "TGA": tga_file,
    "PCX": pcx_file,
    "EPS": eps_file,
    "PDF": pdf_file,
    "SVG": svg_file,
    "PPM": ppm_file,
    "JPEG2000": jpeg2000_file,
    "DDS": dds_file,
    "QOI": qoi_file,
    "SGI": sgi_file,
}
"""Formats the server refuses, each naming the field and listing the accepted formats."""


# -- several frames in one file: the first one is used --------------------------------------------

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _frames(size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, RED), Image.new("RGB", size, BLUE)]


def animated(format: str) -> bytes:
    """A two-frame file (GIF, PNG (APNG), WEBP or TIFF (two pages)), red then blue. Must be accepted
    and read as its first frame: all red, a plain single-frame image."""
    first, *rest = _frames()
    buffer = io.BytesIO()
    options = {"lossless": True} if format == "WEBP" else {}
    first.save(buffer, format=format, save_all=True, append_images=rest, duration=100, **options)
    return buffer.getvalue()


def mpo_file() -> bytes:
    """A two-frame MPO (stereo camera JPEG), red then blue. Must be accepted (it is a JPEG) and read
    as its first frame: red."""
    first, *rest = _frames()
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=rest, quality=95)
    return buffer.getvalue()
