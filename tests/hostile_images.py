"""Image files users might send as `image` or `mask`, hostile or merely unusual, built as bytes.

Each builder's docstring says what the server must answer. "Refused" always means an InputError
naming the field (`image: ...` or `mask: ...`), never a 5xx; a file over the pixel limit or in a
format not read is refused before any pixel is decoded, and the latter's message lists the
formats the server reads (sdcog.fetch.images.ACCEPTED_FORMATS: PNG, JPEG, WEBP, GIF, BMP, TIFF).
Use them from another test module as `from hostile_images import ...` (tests/ is on sys.path).

The PNG and TIFF writers are written by hand (not with Pillow), so the files hold exactly what
their headers claim, whatever the installed Pillow can or cannot write.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np
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
    packed = [(tag, kind, _tiff_values(kind, values, order)) for tag, kind, values in tags]
    return _tiff_file(data, packed, order)


def _tiff_values(kind: int, values: Sequence[int], order: str = "<") -> bytes:
    return struct.pack(order + ("H" if kind == _TIFF_SHORT else "I") * len(values), *values)


def _tiff_file(data: bytes, tags: Sequence[tuple[int, int, bytes]], order: str = "<") -> bytes:
    """A TIFF of one IFD: the header, `data` (so a strip at offset 8 starts it), then the IFD of
    `tags` (tag, SHORT or LONG, the values packed in `order`); values over 4 bytes follow it."""
    data += b"\x00" * (len(data) % 2)  # the IFD that follows starts on a word boundary
    ifd_offset = 8 + len(data)
    out_of_line_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, out_of_line, out_of_line_size = [], [], 0
    for tag, kind, packed in sorted(tags):
        count = len(packed) // (2 if kind == _TIFF_SHORT else 4)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack(order + "I", out_of_line_offset + out_of_line_size)
            out_of_line.append(packed)
            out_of_line_size += len(packed)
        entries.append(struct.pack(order + "HHI", tag, kind, count) + field)
    header = (b"MM\x00\x2a" if order == ">" else b"II\x2a\x00") + struct.pack(order + "I", ifd_offset)
    ifd = struct.pack(order + "H", len(tags)) + b"".join(entries) + struct.pack(order + "I", 0)
    return header + data + ifd + b"".join(out_of_line)


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


# -- floods: files within the size limit stuffed with structure -----------------------------------

FLOOD_BYTES = 31_900_000
"""How large each flood is: just under SDCOG_MAX_INPUT_MB's default 32 MB (32,000,000 bytes)."""


def _flooded(before: bytes, unit: bytes, after: bytes, size: int = FLOOD_BYTES) -> bytes:
    """`before`, then `unit` repeated to make the file about `size` bytes, then `after`."""
    return before + unit * ((size - len(before) - len(after)) // len(unit)) + after


def png_chunk_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 1x1 PNG whose IHDR is followed by ~2.7 million empty private chunks (12 bytes each,
    valid CRCs), then its pixels. Pillow reads each in Python while opening it (13 s, +309 MiB
    here). Must be refused naming the field, in well under a second."""
    data = png(1, 1)
    return _flooded(data[:33], _chunk(b"prVt", b""), data[33:], size)


def png_idat_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 1x1 PNG whose pixels come after ~2.7 million empty IDAT chunks (empty data chunks are
    valid). Pillow walks them in Python while decoding (4.6 s here). Must be refused naming the
    field, in well under a second."""
    data = png(1, 1)
    return _flooded(data[:33], _chunk(b"IDAT", b""), data[33:], size)


def jpeg_marker_flood(size: int = FLOOD_BYTES) -> bytes:
    """An 8x8 JPEG with ~8 million empty APP0 segments (4 bytes each) after its SOI. Pillow walks
    the segments before the first scan in Python while opening it (18 s, +1.1 GiB here). Must
    be refused naming the field, in well under a second."""
    data = _saved("JPEG", (8, 8))
    return _flooded(data[:2], b"\xff\xe0\x00\x02", data[2:], size)


def jpeg_fill_flood(size: int = FLOOD_BYTES) -> bytes:
    """An 8x8 JPEG whose first segment is preceded by ~32 million 0xFF fill bytes (which the
    standard allows before any marker). Pillow reads them one at a time in Python (26 s, +121 MiB
    here). Must be refused naming the field, in well under a second."""
    data = _saved("JPEG", (8, 8))
    return _flooded(data[:2], b"\xff", data[2:], size)


def jpeg_scan_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 2000x2000 grey progressive JPEG whose last scan (an AC refinement, 36 bytes with its
    Huffman table) is repeated ~900,000 times. libjpeg goes over every block of the image for each
    scan (over 100 s here, hours in all). Must be refused naming the field, in well under a second."""
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000), 128).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xc4")  # its Huffman table, then SOS, then 4 bytes of data
    return _flooded(data[:last_scan], data[last_scan:-2], data[-2:], size)


def _gif_blocks_start(data: bytes) -> int:
    """Where a GIF's first block (extension or image) starts: after its header and palette."""
    flags = data[10]
    return 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)


def gif_comment_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 32x32 GIF whose image follows ~6.4 million one-byte comment extensions (5 bytes each).
    Pillow reads each in Python while opening it (5 s, +1.1 GiB here). Must be refused naming
    the field, in well under a second."""
    data = _saved("GIF")
    start = _gif_blocks_start(data)
    return _flooded(data[:start], b"!\xfe\x01X\x00", data[start:], size)


def gif_sub_block_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 32x32 GIF whose image follows one application extension of ~16 million one-byte data
    sub-blocks. Pillow reads each sub-block in Python while opening it (2.8 s here). Must be refused
    naming the field, in well under a second."""
    data = _saved("GIF")
    start = _gif_blocks_start(data)
    head = data[:start] + b"!\xff\x0bFLOODFLOOD1"
    return _flooded(head, b"\x01X", b"\x00" + data[start:], size)


def gif_junk_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 32x32 GIF whose image follows ~32 million stray bytes (neither an extension nor an
    image). Pillow skips them one at a time in Python while opening it (3.8 s here). Must be
    refused naming the field, in well under a second."""
    data = _saved("GIF")
    start = _gif_blocks_start(data)
    return _flooded(data[:start], b"\x00", data[start:], size)


def tiff_strip_flood(size: int = FLOOD_BYTES, *, rows: int | None = None) -> bytes:
    """A 1-pixel-wide grey TIFF of ~4 million rows in one-row strips (their offsets all point at
    the same byte); `rows` makes its header claim another height. Pillow decodes each strip
    separately, in Python (30 s, +1.3 GiB here). Must be refused naming the field, in well
    under a second."""
    strips = (size - 200) // 8
    rows_per_strip = [(278, _TIFF_LONG, _tiff_values(_TIFF_LONG, [1]))]
    return _tiff_flood(1, strips if rows is None else rows, rows_per_strip, strips, 273, 279)


def tiff_tile_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 16-pixel-wide grey TIFF of 16x16 tiles, as many as 50 megapixels allow (195,000; their
    offsets all point at the same bytes). Pillow decodes each tile separately, in Python (1.8 s,
    +152 MiB here). Must be refused naming the field, in well under a second."""
    tiles = min((size - 200) // 8, 50_000_000 // 256)
    tile_size = [
        (322, _TIFF_LONG, _tiff_values(_TIFF_LONG, [16])),
        (323, _TIFF_LONG, _tiff_values(_TIFF_LONG, [16])),
    ]
    return _tiff_flood(16, 16 * tiles, tile_size, tiles, 324, 325)


def _tiff_flood(
    width: int,
    height: int,
    layout: list[tuple[int, int, bytes]],
    pieces: int,
    offsets_tag: int,
    counts_tag: int,
) -> bytes:
    """An uncompressed 8-bit grey TIFF of `pieces` strips or tiles that all read the same bytes."""
    piece_bytes = 16 * 16 if offsets_tag == 324 else width
    tags = [
        (256, _TIFF_LONG, _tiff_values(_TIFF_LONG, [width])),
        (257, _TIFF_LONG, _tiff_values(_TIFF_LONG, [height])),
        (258, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [8])),
        (259, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
        (262, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
        (277, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
        (offsets_tag, _TIFF_LONG, struct.pack("<I", 8) * pieces),
        (counts_tag, _TIFF_LONG, struct.pack("<I", piece_bytes) * pieces),
        *layout,
    ]
    return _tiff_file(b"\x80" * piece_bytes, tags)


def jpeg_table_flood(size: int = FLOOD_BYTES) -> bytes:
    """An 8x8 JPEG whose SOI is followed by ~490 DQT segments of 1,000 quantization tables each
    (64 kB apiece). Pillow parses each table in Python while opening it (3.1 s here). Must be
    refused naming the field, in well under a second."""
    data = _saved("JPEG", (8, 8))
    tables = (b"\x00" + bytes(range(1, 65))) * 1000
    return _flooded(data[:2], b"\xff\xdb" + struct.pack(">H", 2 + len(tables)) + tables, data[2:], size)


def _exif_png(ifds: Sequence[Sequence[tuple[int, int, int, int]]], values: bytes = b"") -> bytes:
    """A 64x32 grey PNG whose eXIf chunk holds little-endian IFDs (each entry: tag, type, count,
    value or offset, where offset -1 is that of the IFD after it, -2 that of `values`)."""
    sizes = [2 + 12 * len(entries) + 4 for entries in ifds]
    starts = [8 + sum(sizes[:index]) for index in range(len(ifds))] + [8 + sum(sizes)]
    blocks = []
    for index, entries in enumerate(ifds):
        fields = {-1: starts[index + 1], -2: starts[-1]}
        packed = [
            struct.pack("<HHII", tag, kind, count, fields.get(value, value))
            for tag, kind, count, value in entries
        ]
        blocks.append(struct.pack("<H", len(entries)) + b"".join(packed) + struct.pack("<I", 0))
    exif = b"II\x2a\x00" + struct.pack("<I", 8) + b"".join(blocks) + values
    data = png(64, 32)
    return data[:33] + _chunk(b"eXIf", exif) + data[33:]


_ORIENTATION_ROTATE_90 = (0x0112, _TIFF_SHORT, 1, 6)  # makes exif_transpose rewrite the Exif


def png_exif_tag_flood() -> bytes:
    """A 64x32 PNG (1.5 MB) whose Exif block has 65,535 tags in its first IFD and 65,535 in the
    Exif IFD it points to, and an orientation. ImageOps.exif_transpose reads and writes them all
    in Python (5.3 s, +42 MiB here). Must be refused naming the field, in well under a second."""
    first = [_ORIENTATION_ROTATE_90, (0x8769, _TIFF_LONG, 1, -1)]
    others = [tag for tag in range(1, 65_536) if tag not in (0x0112, 0x8769)]
    first += [(tag, _TIFF_LONG, 1, 1) for tag in others[:65_533]]
    return _exif_png([sorted(first), [(tag, _TIFF_LONG, 1, 1) for tag in range(1, 65_536)]])


def png_exif_fractions(count: int) -> bytes:
    """A 64x32 PNG whose Exif block has an orientation and an XResolution of `count` fractions
    (RATIONAL values) instead of one. ImageOps.exif_transpose makes an object of each and writes
    it back (4 million: 15 s, +612 MiB here). Over 1,024 fractions (MAX_IFD_FRACTIONS) must be
    refused naming the field, in well under a second."""
    return _exif_png([[_ORIENTATION_ROTATE_90, (0x011A, 5, count, -2)]], struct.pack("<II", 72, 1) * count)


def tiff_tag_flood(size: int = FLOOD_BYTES) -> bytes:
    """A BigTIFF whose first IFD has ~1.6 million tags (20 bytes each; a BigTIFF counts them in 64
    bits). Pillow reads each in Python while opening it (2.2 s here). Must be refused naming the
    field, in well under a second."""
    count = (size - 400) // 20
    header = b"II\x2b\x00" + struct.pack("<HHQ", 8, 0, 16)
    return header + struct.pack("<Q", count) + struct.pack("<HHQ8s", 0xC000, 3, 1, b"") * count + bytes(8)


def tiff_number_flood(size: int = FLOOD_BYTES) -> bytes:
    """An 8x8 palette TIFF whose colour map has ~16 million entries instead of 768 (a palette
    has 3 x 256). Pillow unpacks it into a tuple and a list before checking its size (4.2 s,
    +821 MiB here). Must be refused naming the field, in well under a second."""
    count = (size - 400) // 2
    tags = [
        (256, _TIFF_LONG, _tiff_values(_TIFF_LONG, [8])),
        (257, _TIFF_LONG, _tiff_values(_TIFF_LONG, [8])),
        (258, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [8])),
        (259, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
        (262, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [3])),  # palette
        (273, _TIFF_LONG, _tiff_values(_TIFF_LONG, [8])),
        (277, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
        (278, _TIFF_LONG, _tiff_values(_TIFF_LONG, [8])),
        (279, _TIFF_LONG, _tiff_values(_TIFF_LONG, [64])),
        (320, _TIFF_SHORT, struct.pack("<H", 40_000) * count),
    ]
    return _tiff_file(bytes(64), tags)


def webp_chunk_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 32x32 lossless WebP (with a VP8X header) whose image follows ~4 million empty unknown
    RIFF chunks (8 bytes each). libwebp keeps a record of each (0.4 s, +122 MiB here). Must be
    refused naming the field, in well under a second."""
    data = _saved("WEBP", lossless=True)  # RIFF, size, WEBP, then one VP8L chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (31).to_bytes(3, "little") * 2
    flooded = _flooded(data[:12] + vp8x, b"FLUD\x00\x00\x00\x00", data[12:], size)
    return flooded[:4] + struct.pack("<I", len(flooded) - 8) + flooded[8:]


def webp_frame_flood(size: int = FLOOD_BYTES) -> bytes:
    """A 4x4 animated WebP of ~900,000 frames (ANMF chunks of ~35 bytes). libwebp keeps a record of
    each (0.2 s, +59 MiB here). Must be refused naming the field, in well under a second."""
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = buffer.getvalue()
    first = data.index(b"ANMF")
    length = struct.unpack_from("<I", data, first + 4)[0]
    frame = data[first : first + 8 + length + length % 2]
    flooded = _flooded(data[:first], frame, data[first:], size)
    return flooded[:4] + struct.pack("<I", len(flooded) - 8) + flooded[8:]


FLOODS = {
    "PNG chunks": png_chunk_flood,
    "PNG empty IDAT chunks": png_idat_flood,
    "PNG Exif tags": png_exif_tag_flood,
    "JPEG segments": jpeg_marker_flood,
    "JPEG fill bytes": jpeg_fill_flood,
    "JPEG quantization tables": jpeg_table_flood,
    "JPEG scans": jpeg_scan_flood,
    "GIF comments": gif_comment_flood,
    "GIF sub-blocks": gif_sub_block_flood,
    "GIF stray bytes": gif_junk_flood,
    "TIFF strips": tiff_strip_flood,
    "TIFF tiles": tiff_tile_flood,
    "TIFF tags": tiff_tag_flood,
    "TIFF colour map": tiff_number_flood,
    "WEBP chunks": webp_chunk_flood,
    "WEBP frames": webp_frame_flood,
}
"""Name -> a builder of a file of an accepted format stuffed with structure (chunks, segments,
scans, blocks, strips, tags), most of them ~32 MB: each must be refused naming the field, in
well under a second, the process's memory growing by a few MB at most."""


# -- real files with much structure: accepted, and cheap to scan ----------------------------------


def png_in_small_chunks(side: int = 2000, chunk_size: int = 256) -> bytes:
    """A `side` x `side` grey noise PNG written by Pillow, its pixel data split into IDAT chunks
    of `chunk_size` bytes (~16,000 for the default), as streaming encoders write it. Must be
    accepted, pixel for pixel, and its structure scanned in milliseconds."""
    buffer = io.BytesIO()
    Image.fromarray(noise((side, side))).save(buffer, format="PNG", compress_level=1)
    data = buffer.getvalue()
    first, after = data.index(b"IDAT") - 4, data.rindex(b"IEND") - 4
    pixels, position = b"", first
    while position < after:  # Pillow's own IDAT chunks, joined
        length = struct.unpack_from(">I", data, position)[0]
        pixels += data[position + 8 : position + 8 + length]
        position += 12 + length
    chunks = (
        _chunk(b"IDAT", pixels[start : start + chunk_size]) for start in range(0, len(pixels), chunk_size)
    )
    return data[:first] + b"".join(chunks) + data[after:]


def noise(shape: tuple[int, ...]) -> np.ndarray:
    """Reproducible 8-bit noise, which compresses to about its own size."""
    return np.random.default_rng(0).integers(0, 256, shape, np.uint8)


def progressive_jpeg(mode: str = "RGB", size: tuple[int, int] = (256, 256)) -> bytes:
    """A progressive JPEG of noise as Pillow (libjpeg) writes it: 6 scans in mode "L", 10 in
    "RGB", 18 in "CMYK". Must be accepted."""
    bands = len(mode)
    buffer = io.BytesIO()
    pixels = noise((size[1], size[0], bands) if bands > 1 else (size[1], size[0]))
    Image.fromarray(pixels, mode).save(buffer, format="JPEG", progressive=True, quality=90)
    return buffer.getvalue()


def camera_jpeg() -> bytes:
    """A 64x32 JPEG as a camera writes it: Exif with the usual tags, fractions and a GPS IFD,
    orientation 6 (rotated 90 degrees), and an ICC profile split over several APP2 segments.
    Must be accepted, turned upright (32x64)."""
    exif = Image.Exif()
    exif.update({0x010F: "Camera Maker", 0x0110: "Model 1", 0x0112: 6, 0x0131: "Firmware 1.0"})
    exif.update({0x011A: 72.0, 0x011B: 72.0, 0x0128: 2, 0x0132: "2024:01:01 12:00:00"})
    exif[0x8769] = {0x829A: 0.004, 0x829D: 2.8, 0x8827: 400, 0x9003: "2024:01:01 12:00:00"}
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    buffer = io.BytesIO()
    image = Image.fromarray(noise((32, 64, 3)), "RGB")
    image.save(buffer, format="JPEG", exif=exif, icc_profile=b"\x00" * 200_000)  # 4 APP2 segments
    return buffer.getvalue()


def long_gif(frames: int = 300) -> bytes:
    """A 32x32 GIF of `frames` frames (red, then alternately blue and red), looping, with a
    comment. Must be accepted and read as its first frame, red; later frames are never read."""
    first, *rest = [Image.new("RGB", (32, 32), (RED, BLUE)[index % 2]) for index in range(frames)]
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=rest, loop=0, comment=b"made here")
    return buffer.getvalue()


def long_apng(frames: int = 4200) -> bytes:
    """A 4x4 animated PNG of `frames` frames (red, then alternately blue and red): more frame
    control chunks than MAX_PNG_CHUNKS, but Pillow reads none past the first frame's. Must be
    accepted and read as its first frame, red."""
    first, *rest = [Image.new("RGB", (4, 4), (RED, BLUE)[index % 2]) for index in range(frames)]
    buffer = io.BytesIO()
    first.save(buffer, format="PNG", save_all=True, append_images=rest, duration=40)
    return buffer.getvalue()


def many_page_tiff(pages: int = 50) -> bytes:
    """A TIFF of `pages` 32x32 pages (red, then alternately blue and red). Must be accepted and
    read as its first page, red."""
    first, *rest = [Image.new("RGB", (32, 32), (RED, BLUE)[index % 2]) for index in range(pages)]
    buffer = io.BytesIO()
    first.save(buffer, format="TIFF", save_all=True, append_images=rest)
    return buffer.getvalue()


def tiff_in_row_strips(rows: int = 2000, compression: str | None = None) -> bytes:
    """A 1000 x `rows` grey noise TIFF in one-row strips (`rows` strips), uncompressed (written
    here: Pillow writes one strip) or with `compression` ("tiff_lzw"..., written by Pillow). Must
    be accepted, pixel for pixel."""
    pixels = noise((rows, 1000))
    if compression is None:
        offsets = (8 + 1000 * np.arange(rows, dtype="<u4")).tobytes()
        tags = [
            (256, _TIFF_LONG, _tiff_values(_TIFF_LONG, [1000])),
            (257, _TIFF_LONG, _tiff_values(_TIFF_LONG, [rows])),
            (258, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [8])),
            (259, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
            (262, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
            (273, _TIFF_LONG, offsets),
            (277, _TIFF_SHORT, _tiff_values(_TIFF_SHORT, [1])),
            (278, _TIFF_LONG, _tiff_values(_TIFF_LONG, [1])),
            (279, _TIFF_LONG, struct.pack("<I", 1000) * rows),
        ]
        return _tiff_file(pixels.tobytes(), tags)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF", compression=compression, strip_size=1000)
    return buffer.getvalue()
