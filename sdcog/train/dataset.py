"""The training set in `input_images`: an archive of images and their captions, read and prepared.

The archive is a zip or a tar (plain, gzip, bzip2 or xz), recognised by its content, never by its
name (a presigned URL often has no suffix). It is read as hostile: at most `MAX_ENTRIES` entries,
`MAX_ENTRY_BYTES` per file and `MAX_TOTAL_BYTES` together, counted as they are read; a name that
would leave the archive (`..`, an absolute path) is refused; links and other non-files are
skipped, as are the folders and files that archivers add (`__MACOSX/`, `._*`, `.DS_Store`).
Nested archives are not opened.

Captions, first match wins:
1. `caption.csv` (columns `caption,image_file`; `image_file` relative to the CSV's folder, or a
   file name found once in the archive);
2. a `.txt` file with the image's name beside it (`dog1.jpg` and `dog1.txt`);
3. `caption_prefix` followed by the trigger word (`a photo of TOK`).

Each image is read as `image` inputs are (only PNG, JPEG, WEBP, GIF, BMP and TIFF, bounded before
decoding, EXIF orientation applied), made RGB, cropped to its centre square and resized to
`resolution`. Every refusal names `input_images` and the entry.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdcog.errors import InputError
from sdcog.fetch.adapter_archives import DEFAULT_TRIGGER_WORD, CheckedTarInfo, decompressed, is_tar
from sdcog.fetch.images import open_image

log = logging.getLogger(__name__)

FIELD = "input_images"
MAX_ENTRIES = 2000
"""The most entries (files and folders) an archive may have."""
MAX_IMAGES = 1000
MAX_ENTRY_BYTES = 100_000_000
MAX_TOTAL_BYTES = 2_000_000_000
"""What all the files together may unpack to."""
MIN_SIDE = 64
"""Images with a shorter side are refused: too small to learn anything from."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_CSV = "caption.csv"
DEFAULT_CAPTION_PREFIX = "a photo of "
_SKIPPED = ("__MACOSX/", ".DS_Store")


@dataclass(frozen=True)
class TrainingImage:
    name: str
    """Its path in the archive."""
    image: Image.Image
    """RGB, `resolution` x `resolution`."""
    caption: str
    caption_from: str
    """Where the caption came from: caption.csv, the .txt file's name, or the trigger word."""


def read_training_set(
    archive: Path,
    resolution: int,
    trigger_word: str = DEFAULT_TRIGGER_WORD,
    caption_prefix: str = DEFAULT_CAPTION_PREFIX,
) -> list[TrainingImage]:
    """The archive's images with their captions, prepared for training; see the module docstring."""
    files = dict(_entries(archive))
    images = sorted(name for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise InputError(FIELD, f"the archive holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(images) > MAX_IMAGES:
        raise InputError(FIELD, f"the archive holds {len(images)} images; the limit is {MAX_IMAGES}")
    from_csv = _csv_captions(files, images)
    default = f"{caption_prefix}{trigger_word}".strip()
    prepared = []
    for name in images:
        text_file = posixpath.splitext(name)[0] + ".txt"
        if name in from_csv:
            caption, source = from_csv[name]
        elif text_file in files:
            caption, source = _text(files[text_file], text_file).strip(), text_file
        else:
            caption, source = default, "caption_prefix and trigger_word"
        prepared.append(TrainingImage(name, _prepare(name, files[name], resolution), caption, source))
    for item in prepared:
        log.info("%s: %s -> %r (caption from %s)", FIELD, item.name, item.caption, item.caption_from)
    log.info("%s: %d images at %dx%d", FIELD, len(prepared), resolution, resolution)
    return prepared


def _prepare(name: str, data: bytes, resolution: int) -> Image.Image:
    try:
        image = open_image(FIELD, data)
    except InputError as error:
        raise InputError(FIELD, f"{name}: {str(error).removeprefix(f'{FIELD}: ')}") from error
    if min(image.size) < MIN_SIDE:
        raise InputError(
            FIELD, f"{name}: is {image.width}x{image.height} pixels; each side must be at least {MIN_SIDE}"
        )
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(FIELD, f"{name}: is not UTF-8 text") from error


def _csv_captions(files: dict[str, bytes], images: list[str]) -> dict[str, tuple[str, str]]:
    """Each image's caption from caption.csv files (image name -> (caption, the CSV's name))."""
    by_file_name: dict[str, list[str]] = {}
    for image in images:
        by_file_name.setdefault(posixpath.basename(image), []).append(image)
    captions: dict[str, tuple[str, str]] = {}
    for csv_name in sorted(name for name in files if posixpath.basename(name).lower() == CAPTION_CSV):
        rows = csv.DictReader(io.StringIO(_text(files[csv_name], csv_name)))
        if not {"caption", "image_file"} <= set(rows.fieldnames or ()):
            raise InputError(FIELD, f"{csv_name}: needs the columns caption and image_file")
        folder = posixpath.dirname(csv_name)
        for line, row in enumerate(rows, start=2):
            wanted = (row["image_file"] or "").strip()
            relative = posixpath.normpath(posixpath.join(folder, wanted)) if wanted else ""
            found = [relative] if relative in files else by_file_name.get(posixpath.basename(wanted), [])
            if len(found) != 1:
                what = "no image" if not found else f"{len(found)} images"
                raise InputError(FIELD, f"{csv_name} line {line}: {wanted!r} names {what} in the archive")
            captions[found[0]] = ((row["caption"] or "").strip(), csv_name)
    return captions


def _checked_name(name: str) -> str | None:
    """The entry's path inside the archive, or None for what archivers add; refused if it escapes."""
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise InputError(FIELD, f"{name!r}: an absolute path; entries must stay inside the archive")
    normal = posixpath.normpath(name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise InputError(FIELD, f"{name!r}: a path that leaves the archive")
    base = posixpath.basename(normal)
    if any(part in normal for part in _SKIPPED) or base.startswith("._"):
        return None
    return normal


class _Budget:
    def __init__(self) -> None:
        self.entries = self.total = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise InputError(FIELD, f"the archive has more than {MAX_ENTRIES} entries")

    def read(self, name: str, source, declared: int) -> bytes:
        if declared > MAX_ENTRY_BYTES:
            raise InputError(FIELD, f"{name}: {declared:,} bytes; the limit is {MAX_ENTRY_BYTES:,} per file")
        data = source.read(MAX_ENTRY_BYTES + 1)
        if len(data) > MAX_ENTRY_BYTES:
            raise InputError(FIELD, f"{name}: over the limit of {MAX_ENTRY_BYTES:,} bytes per file")
        self.unpacked(len(data))
        return data

    def unpacked(self, size: int) -> None:
        """`size` more bytes unpacked: a file read, or a tar member skipped (it is still
        decompressed to reach the next one)."""
        self.total += size
        if self.total > MAX_TOTAL_BYTES:
            raise InputError(FIELD, f"the archive unpacks to more than {MAX_TOTAL_BYTES:,} bytes")


def _entries(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file worth reading in the zip or tar, by its content."""
    budget = _Budget()
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as opened:
                for info in opened.infolist():
                    budget.entry()
                    name = _checked_name(info.filename)
                    if name is None or info.is_dir() or not _wanted(name):
                        continue
                    with opened.open(info) as source:
                        yield name, budget.read(name, source, info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise InputError(FIELD, f"the zip archive is damaged ({error})") from error
        return
    if not is_tar(archive):
        raise InputError(FIELD, "is neither a zip nor a tar archive (plain, gzip, bzip2 or xz)")
    try:
        with archive.open("rb") as raw, decompressed(raw) as stream:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=CheckedTarInfo) as opened:
                for member in opened:
                    budget.entry()
                    name = _checked_name(member.name)
                    if name is None or not member.isfile() or not _wanted(name):
                        budget.unpacked(member.size)
                        continue
                    yield name, budget.read(name, opened.extractfile(member), member.size)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InputError(FIELD, f"the tar archive is damaged or cannot be read ({error})") from error


def _wanted(name: str) -> bool:
    lower = name.lower()
    return (
        lower.endswith(IMAGE_SUFFIXES) or lower.endswith(".txt") or posixpath.basename(lower) == CAPTION_CSV
    )
