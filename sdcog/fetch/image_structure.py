"""Bounded scans of an image file's structure, before Pillow reads it.

Pillow reads much of a file's structure in Python, one piece at a time: a PNG's chunks, a JPEG's
segments before its first scan, a GIF's extension blocks, an uncompressed TIFF's strips or tiles,
the entries and values of TIFF and Exif IFDs; libwebp keeps a record of each RIFF chunk; and
libjpeg goes over the whole image once per scan of a progressive JPEG. Each piece costs
microseconds (and often memory) however little it holds, so a file within the size limit that
holds millions of them takes minutes and gigabytes to read. `check_structure` counts them first,
walking the file's framing with `struct` (skipping each piece by its length, never reading its
data), and refuses the file as soon as a count passes its cap, so a scan costs at most a cap's
worth of steps whatever the file holds. `check_exif` does the same for the Exif block of an
opened image, before ImageOps.exif_transpose parses it (a JPEG's is checked before opening it,
as Pillow parses it while opening). The caps are far above what real encoders write; each
scan follows what Pillow reads (its first frame only), so pieces it never reads are not counted.
BMP has no such structure.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

from PIL import Image

from sdcog.errors import InputError

MAX_PNG_CHUNKS = 4096
"""PNG chunks other than image data read with the first frame. Real images have a handful
(IHDR, PLTE, tRNS, gAMA, iCCP, pHYs, text, eXIf, IEND), a few dozen at most. Pillow reads each in
Python, ~5 us and a bytes object apiece."""
MAX_PNG_DATA_CHUNKS = 65_536
"""IDAT chunks (and an APNG's first-frame fdAT ones). libpng writes 8 kB chunks and Pillow 64 kB
ones, so 32 MB of pixels is a few thousand; one chunk per row fits an image 65,536 rows tall.
Pillow walks them in Python while decoding, ~2 us apiece, empty ones included."""
MAX_JPEG_SEGMENTS = 4096
"""JPEG marker segments (APPn, COM, DQT, DHT, SOF, SOS, RSTn...). Real files have a few dozen: a
progressive one ~30, one with a large ICC profile or extended XMP split into 64 kB segments a few
hundred. Pillow reads those before the first scan in Python, ~2 us and a bytes object apiece."""
MAX_JPEG_STRAY_BYTES = 65_536
"""Bytes between JPEG segments that start no marker: junk, or 0xFF fill bytes (which may precede
any marker). Real files have none or a few; a damaged one may have kilobytes (the rest of a
segment whose length is off). Pillow reads them one at a time in Python before the first scan,
~1 us each."""
MAX_JPEG_PARSED_BYTES = 1_000_000
"""Bytes of the JPEG segments whose contents Pillow parses in Python loops while opening the file:
SOFn (a tuple per 3 bytes), DQT (a list per table), Photoshop APP13 (per resource), Exif APP1
(each one copies all those before it). Real files have a few hundred bytes of the first two and
at most 64 kB of each of the others; a megabyte takes Pillow 0.1-0.2 s."""
MAX_JPEG_SCANS = 24
"""Scans (SOS segments). A baseline JPEG has 1; libjpeg's progressive script 10 (6 grey, 18
CMYK), mozjpeg's about as many. libjpeg goes over every block of a scan's components for each
scan, however few bytes it holds: ~45 ms on a 49-megapixel image here, where a 6-scan grey one
takes 0.3 s to decode and one at the cap 1.1 s. (libjpeg-turbo's fuzzers stop at 500 scans, on
images of 1 megapixel at most.)"""
MAX_GIF_BLOCKS = 16_384
"""Blocks before a GIF's first image: extensions, their data sub-blocks (up to 255 bytes each)
and stray bytes. Real files have a few (NETSCAPE2.0 looping, a graphic control, a comment or an
XMP packet of a few hundred sub-blocks); 16,384 sub-blocks hold 4 MB. Pillow reads each in
Python while opening the file."""
MAX_WEBP_CHUNKS = 65_536
"""RIFF chunks of a WebP, frames (ANMF) included. A still image has at most seven (VP8X, ICCP,
ALPH, VP8/VP8L, EXIF, XMP); an animation one more per frame (65,536 frames is 36 minutes at
30 fps). libwebp keeps a record of each, 30 to 70 bytes."""
MAX_TIFF_PIECES = 65_536
"""Strips or tiles of a TIFF. libtiff writes ~8 kB strips, so a 50-megapixel RGB image has 18,000,
and one-row strips of an image 65,536 rows tall fit. Pillow decodes an uncompressed TIFF's strips
one by one in Python (65,536 take 0.3-0.4 s and 20 MB here). Nor may a TIFF list more of them
than its size needs: Pillow would decode each, over and over the same pixels."""
MAX_IFD_ENTRIES = 1024
"""Entries (tags) of one TIFF or Exif IFD. Real ones have 10 to 60 (a camera raw's ~100). Pillow
reads each in Python, and ImageOps.exif_transpose writes an Exif block's back (two IFDs of
65,535 tags took it 5 s here). A classic TIFF allows 65,535, a BigTIFF 2**64."""
MAX_IFD_NUMBERS = 3 * 65_536
"""Numbers (SHORT, LONG, RATIONAL... values) in a TIFF's first IFD, or in an Exif block's IFDs,
besides a TIFF's strip and tile tables (see MAX_TIFF_PIECES). Pillow unpacks each into a Python
object. Real Exif blocks hold a few dozen; the largest standard TIFF tables, a 16-bit image's
colour map or TransferFunction, 3 x 65,536."""
MAX_IFD_FRACTIONS = 1024
"""RATIONAL and SRATIONAL values among those numbers: Pillow makes each an IFDRational object,
which ImageOps.exif_transpose writes back, ~4 us and ~150 bytes apiece (4 million took 15 s and
612 MiB here). Real files hold a few dozen (resolutions, exposure, GPS coordinates)."""

_PNG_DATA_CHUNKS = (b"IDAT", b"fdAT")
_APNG_MAX_FRAMES = 0x80000000
"""Pillow takes one acTL declaring 1 to 2**31 frames; otherwise the PNG is a still image."""
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_UNSIZED = frozenset((0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)))
"""Markers Pillow reads without a length (RSTn, SOI, EOI, JPG, JPGn): its MARKER table's."""
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_DQT, _JPEG_APP1, _JPEG_APP13 = 0xDB, 0xE1, 0xED
_JPEG_EXIF, _JPEG_PHOTOSHOP = b"Exif\x00\x00", b"Photoshop 3.0\x00"
_JPEG_NOT_FILL = re.compile(rb"[^\xff]")
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""The marker ending a scan's entropy-coded data, in which 0xFF 0x00 is a stuffed 0xFF byte and
0xFF 0xD0-D7 a restart marker."""
_TIFF_STRIP_OFFSETS, _TIFF_STRIP_BYTES, _TIFF_TILE_OFFSETS, _TIFF_TILE_BYTES = 273, 279, 324, 325
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_SAMPLES, _TIFF_ROWS_PER_STRIP = 256, 257, 277, 278
_TIFF_PLANAR, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 284, 322, 323
_TIFF_INTEGERS = {3: "H", 4: "L", 13: "L", 16: "Q"}  # SHORT, LONG, IFD, LONG8
_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
"""Bytes per value of the types Pillow reads (it skips tags of other types)."""
_TIFF_NUMBERS = frozenset((3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16))
"""The types Pillow unpacks into a Python number per value (BYTE and UNDEFINED stay bytes, ASCII
becomes one str)."""
_TIFF_FRACTIONS = frozenset((5, 10))  # RATIONAL, SRATIONAL
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
"""The Exif block's IFDs that ImageOps.exif_transpose reads, besides the first."""


_Entry = tuple[int, int, int, bytes]
"""An IFD entry: tag, type, count, and the value itself or its offset."""


class _TooMany(Exception):
    """What a scan found past its cap, as the end of a refusal ("has over ...")."""


def check_structure(field: str, data: bytes) -> None:
    """Refuse `data`, naming `field`, if its structure holds more pieces than Pillow reads
    cheaply (see the MAX_ constants). Costs at most a cap's worth of steps, whatever the file."""
    Image.init()
    for format, scan in _SCANS.items():
        if Image.OPEN[format][1](data[:16]) is True:  # the format Image.open will read it as
            try:
                scan(data)
            except _TooMany as problem:
                raise InputError(field, f"{problem} (re-save it)") from None
            return


def check_exif(field: str, info: Mapping[str, object]) -> None:
    """Refuse an opened image, naming `field`, if the Exif block in its `info` (which
    ImageOps.exif_transpose parses in Python) has IFDs too large; see MAX_IFD_ENTRIES."""
    block = info.get("exif")
    raw_profile = info.get("Raw profile type exif")  # PNG text chunks: hex after three lines
    if block is None and isinstance(raw_profile, str):
        try:
            block = bytes.fromhex("".join(raw_profile.split("\n")[3:]))
        except ValueError:
            return  # Pillow refuses it too
    if isinstance(block, bytes):
        try:
            _exif(block)
        except _TooMany as problem:
            raise InputError(field, f"{problem} (re-save it)") from None


def _png(data: bytes) -> None:
    """Count the chunks Pillow reads with the first frame: all of them up to IEND, or in an
    animated PNG those up to the fcTL starting the second frame (Pillow stops there)."""
    position, others, image_data = 8, 0, 0
    animation_controls, animated = 0, False
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind in _PNG_DATA_CHUNKS:
            image_data += 1
            if image_data > MAX_PNG_DATA_CHUNKS:
                raise _TooMany(f"has over {MAX_PNG_DATA_CHUNKS:,} PNG image data chunks")
        elif kind == b"IEND" or (kind == b"fcTL" and animated and image_data):
            return
        else:
            others += 1
            if others > MAX_PNG_CHUNKS:
                raise _TooMany(f"has over {MAX_PNG_CHUNKS:,} PNG chunks besides image data")
            if kind == b"acTL" and not image_data and length >= 8 and position + 12 <= len(data):
                animation_controls += 1
                (frames,) = struct.unpack_from(">I", data, position + 8)
                animated = animation_controls == 1 and 2 <= frames <= _APNG_MAX_FRAMES
        position += 12 + length  # length, type, data, CRC


def _jpeg(data: bytes) -> None:
    """Count segments, stray bytes and scans: before the first scan as Pillow reads them, after
    it as libjpeg does (skipping the entropy-coded data), up to EOI (an MPO's first image).
    Check the Exif block Pillow assembles from the APP1 segments before the first scan."""
    too_many_stray = _TooMany(f"has over {MAX_JPEG_STRAY_BYTES:,} stray bytes between JPEG segments")
    position, stray, segments, parsed_bytes, scans = 2, 0, 0, 0, 0  # after SOI
    exif: list[bytes] = []
    exif_size = 0
    while position < len(data):
        # The next marker: 0xFF (after any fill bytes) and a byte that is not; Pillow reads any
        # bytes before it one at a time, so they count.
        end = min(len(data), position + MAX_JPEG_STRAY_BYTES - stray + 2)
        first = data.find(b"\xff", position, end)
        after = _JPEG_NOT_FILL.search(data, first + 1, end) if first >= 0 else None
        if after is None:
            if end < len(data):
                raise too_many_stray
            break
        stray += after.start() - 1 - position
        segments += 1
        if stray > MAX_JPEG_STRAY_BYTES:
            raise too_many_stray
        if segments > MAX_JPEG_SEGMENTS:
            raise _TooMany(f"has over {MAX_JPEG_SEGMENTS:,} JPEG segments")
        marker, position = data[after.start()], after.start() + 1
        if marker == _JPEG_EOI and scans:
            break  # libjpeg stops here; before a scan, Pillow reads on
        if marker in _JPEG_UNSIZED or marker == 0 or position + 2 > len(data):
            continue  # 0xFF 0x00 is skipped by Pillow
        size, start = max(2, struct.unpack_from(">H", data, position)[0]), position + 2
        is_exif = marker == _JPEG_APP1 and data.startswith(_JPEG_EXIF, start)
        is_photoshop = marker == _JPEG_APP13 and data.startswith(_JPEG_PHOTOSHOP, start)
        if not scans and (marker in _JPEG_SOF or marker == _JPEG_DQT or is_exif or is_photoshop):
            parsed_bytes += size + (exif_size if is_exif else 0)  # Pillow copies the Exif to join
            if parsed_bytes > MAX_JPEG_PARSED_BYTES:
                raise _TooMany(f"has over {MAX_JPEG_PARSED_BYTES:,} bytes of JPEG headers and metadata")
            if is_exif:  # Pillow's Exif: the first segment, then the others without their prefix
                exif.append(data[start + 6 if exif else start : position + size])
                exif_size += len(exif[-1])
        position += size
        if marker == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _TooMany(f"has over {MAX_JPEG_SCANS:,} JPEG scans")
            found = _JPEG_NEXT_MARKER.search(data, position)
            position = found.start() if found else len(data)
    _exif(b"".join(exif))


def _gif(data: bytes) -> None:
    """Count the blocks before the first image, which Pillow reads in Python while opening the
    file (that image's data sub-blocks go to its decoder, in C; later frames are never read)."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global palette
    blocks = 0
    while position < len(data) and data[position] not in b",;":
        blocks += 1
        if data[position] == ord("!"):  # an extension: a label, then sub-blocks up to an empty one
            position += 2
            while position < len(data) and data[position] and blocks <= MAX_GIF_BLOCKS:
                position += 1 + data[position]
                blocks += 1
        position += 1  # the empty sub-block ending an extension, or a stray byte
        if blocks > MAX_GIF_BLOCKS:
            raise _TooMany(f"has over {MAX_GIF_BLOCKS:,} GIF blocks before its first image")


def _webp(data: bytes) -> None:
    """Count the RIFF chunks, skipping each by its size."""
    position, chunks = 12, 0  # after RIFF, the size and WEBP
    while position + 8 <= len(data):
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise _TooMany(f"has over {MAX_WEBP_CHUNKS:,} WebP chunks")
        (size,) = struct.unpack_from("<I", data, position + 4)
        position += 8 + size + size % 2


def _tiff(data: bytes) -> None:
    """Check the first IFD as Pillow reads it (the others are further pages, never read here):
    its entries and numbers, and its strips or tiles, no more than its size needs."""
    endian = "<" if data[:2] == b"II" else ">"
    big = data[2] == 43  # BigTIFF, as Pillow tells it
    if len(data) < (16 if big else 8):
        return
    (offset,) = struct.unpack_from(endian + ("Q" if big else "L"), data, 8 if big else 4)
    entries = _ifd(data, offset, endian, big, "TIFF")
    tables = (_TIFF_STRIP_OFFSETS, _TIFF_STRIP_BYTES, _TIFF_TILE_OFFSETS, _TIFF_TILE_BYTES)
    _count_numbers(data, [entry for entry in entries if entry[0] not in tables], endian, "TIFF")
    pieces: dict[int, int] = {}
    values: dict[int, int] = {}
    for tag, kind, count, field in entries:
        if tag in (_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS):
            pieces[tag] = max(pieces.get(tag, 0), count)  # the largest, whichever Pillow keeps
        elif count == 1 and tag not in values and (value := _integer(kind, field, endian)) is not None:
            values[tag] = value
    most = max(pieces.values(), default=0)
    if most > MAX_TIFF_PIECES:
        raise _TooMany(f"has {most:,} TIFF strips or tiles; the limit is {MAX_TIFF_PIECES:,}")
    width, height = values.get(_TIFF_WIDTH, 0), values.get(_TIFF_HEIGHT, 0)
    planes = values.get(_TIFF_SAMPLES, 1) if values.get(_TIFF_PLANAR) == 2 else 1
    if _TIFF_STRIP_OFFSETS in pieces:  # Pillow reads strips when a file lists both
        what, listed = "strips", pieces[_TIFF_STRIP_OFFSETS]
        needed = -(-height // max(1, values.get(_TIFF_ROWS_PER_STRIP, height))) * planes
    else:
        what, listed = "tiles", pieces.get(_TIFF_TILE_OFFSETS, 0)
        across = -(-width // max(1, values.get(_TIFF_TILE_WIDTH, width)))
        down = -(-height // max(1, values.get(_TIFF_TILE_LENGTH, height)))
        needed = across * down * planes
    if listed > max(1, needed):
        raise _TooMany(f"has {listed:,} TIFF {what} where its {width}x{height} pixels need {needed:,}")


def _exif(block: bytes) -> None:
    """Check the IFDs of an Exif block that ImageOps.exif_transpose reads: the first, and the
    Exif, GPS and Interop IFDs it points to."""
    block = re.sub(b"^(Exif\x00\x00){1,2}", b"", block)  # as Image.Exif.load
    if block[:2] not in (b"II", b"MM") or len(block) < 8 or block[2] == 43:
        return  # not a TIFF header Pillow reads: it refuses the image
    endian = "<" if block[:2] == b"II" else ">"
    first = _ifd(block, struct.unpack_from(endian + "L", block, 4)[0], endian, False, "Exif")
    exif = _pointed_ifd(block, first, _EXIF_IFD, endian)
    gps = _pointed_ifd(block, first, _GPS_IFD, endian)
    interop = _pointed_ifd(block, exif, _INTEROP_IFD, endian)
    _count_numbers(block, first + exif + gps + interop, endian, "Exif")


def _pointed_ifd(block: bytes, entries: list[_Entry], tag: int, endian: str) -> list[_Entry]:
    """The entries of the Exif IFD that `entries` point to with `tag`. Two pointers are refused:
    Pillow follows the first it can read, which need not be the one checked."""
    pointers = [entry for entry in entries if entry[0] == tag]
    if len(pointers) > 1:
        raise _TooMany(f"has {len(pointers)} pointers to one Exif IFD")
    if not pointers or pointers[0][2] != 1:
        return []
    offset = _integer(pointers[0][1], pointers[0][3], endian)
    return [] if offset is None else _ifd(block, offset, endian, False, "Exif")


def _integer(kind: int, field: bytes, endian: str) -> int | None:
    """The integer an entry of one value holds in its value field, if it is one and fits there."""
    code = _TIFF_INTEGERS.get(kind)
    if code is None or struct.calcsize(endian + code) > len(field):
        return None
    return struct.unpack_from(endian + code, field)[0]


def _ifd(data: bytes, offset: int, endian: str, big: bool, what: str) -> list[_Entry]:
    """The entries (tag, type, count, value or its offset) of the IFD at `offset` that the file
    holds (Pillow stops where it ends), none if there is no IFD there; refused past
    MAX_IFD_ENTRIES."""
    count_format, entry_format = endian + ("Q" if big else "H"), endian + ("HHQ8s" if big else "HHL4s")
    start, size = offset + struct.calcsize(count_format), struct.calcsize(entry_format)
    if start > len(data):
        return []
    count = min(struct.unpack_from(count_format, data, offset)[0], (len(data) - start) // size)
    if count > MAX_IFD_ENTRIES:
        raise _TooMany(f"has {count:,} tags in one {what} IFD; the limit is {MAX_IFD_ENTRIES:,}")
    return list(struct.iter_unpack(entry_format, data[start : start + count * size]))


def _count_numbers(data: bytes, entries: list[_Entry], endian: str, what: str) -> None:
    """Refuse IFD entries holding over MAX_IFD_NUMBERS numbers or MAX_IFD_FRACTIONS fractions,
    counting only values Pillow reads: of a type it knows, and within the file."""
    numbers = fractions = 0
    for _tag, kind, count, field in entries:
        size = count * _TIFF_SIZES.get(kind, 0)
        if size > len(field):  # the values are elsewhere: at the offset in the field
            offset = struct.unpack_from(endian + ("L" if len(field) == 4 else "Q"), field)[0]
            if offset + size > len(data):
                continue
        numbers += count if kind in _TIFF_NUMBERS else 0
        fractions += count if kind in _TIFF_FRACTIONS else 0
    if numbers > MAX_IFD_NUMBERS:
        raise _TooMany(f"has over {MAX_IFD_NUMBERS:,} numbers in its {what} tags")
    if fractions > MAX_IFD_FRACTIONS:
        raise _TooMany(f"has over {MAX_IFD_FRACTIONS:,} fractions in its {what} tags")


_SCANS = {"PNG": _png, "JPEG": _jpeg, "GIF": _gif, "WEBP": _webp, "TIFF": _tiff}
"""Per format scanned (Pillow's names), its scan, which raises _TooMany past a cap."""
