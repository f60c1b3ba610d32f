"""Weights archives (a Replicate model's weights arrive as a tar: plain, gzip, bzip2 or xz), read
as hostile until read: the one safetensors member wanted is copied out, nothing else reaches the
disk.

The decompressed stream is counted as it is read and refused past the limit (so is a member whose
header says it is larger); an archive may have at most `MAX_TAR_MEMBERS` members; one level only is
unpacked (a member that is itself an archive is not a safetensors file, so it is refused); tarfile's
unbounded header extensions (pax and GNU long names past `_MAX_EXTENSION_HEADER`, chains of them,
GNU sparse maps) are refused.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sdcog.errors import InputError
from sdcog.fetch.adapter_references import EMBEDDING, AdapterKind, AdapterReference
from sdcog.pinned_internals import relies_on_internals

MAX_ADAPTER_MB_ENV = "SDCOG_MAX_ADAPTER_MB"
MAX_TAR_MEMBERS = 1000
"""The most members a weights archive may have (Replicate's hold a handful)."""
_MAX_EXTENSION_HEADER = 1 << 20
"""The largest pax or GNU long-name header read (tarfile reads one whole into memory)."""
_MAX_EXTENSION_CHAIN = 8
"""The most such headers in a row before a member (tarfile reads each chain recursively)."""
_CHUNK = 1 << 20
_SUFFIX = ".safetensors"
SPECIAL_PARAMS = "special_params.json"
"""Replicate's trainers' map from the trigger word to the tokens it stands for: {"TOK": "<s0><s1>"}."""
DEFAULT_TRIGGER_WORD = "TOK"
_MAX_SPECIAL_PARAMS = 64 * 1024
_TOKENS = re.compile(r"(<s\d+>)+")


def too_large(field: str, reference: AdapterReference, what: str, limit: int) -> InputError:
    """`what` ends with "over" or "past": the limit follows."""
    return InputError(
        field, f"{reference.name}: {what} the limit of {limit / 1e6:g} MB ({MAX_ADAPTER_MB_ENV})"
    )


_COMPRESSIONS = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
    (b"\x5d\x00\x00\x80", lzma.LZMAFile),  # the legacy .lzma format, which tarfile also reads
)
_DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def decompressed(raw: BinaryIO) -> BinaryIO:
    """`raw`, decompressed if it starts as gzip, bzip2 or xz data do; read as it goes, never whole."""
    magic = raw.read(6)
    raw.seek(0)
    for prefix, opener in _COMPRESSIONS:
        if magic.startswith(prefix):
            return opener(raw)
    return raw


class _Unpacked:
    """The bytes of a decompressing stream, counted as they are read: an InputError naming the
    field and SDCOG_MAX_ADAPTER_MB once past `limit`. Each read asks the decompressor for at most
    one byte past the limit, so neither memory nor time can run past it; a damaged stream is a
    `tarfile.ReadError`."""

    def __init__(self, source: BinaryIO, limit: int, field: str, reference: AdapterReference):
        self.source, self.limit, self.field, self.reference = source, limit, field, reference
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.count + 1
        try:
            data = self.source.read(room if size is None or size < 0 else min(size, room))
        except _DECOMPRESSION_ERRORS as error:
            raise tarfile.ReadError(f"{type(error).__name__}: {error}") from error
        self.count += len(data)
        if self.count > self.limit:
            raise too_large(self.field, self.reference, "its archive decompresses past", self.limit)
        return data


@relies_on_internals("python", "3.11", "tarfile.TarInfo._proc_member and _proc_gnusparse_*, overridden")
class CheckedTarInfo(tarfile.TarInfo):
    """tarfile's member headers, with the extensions that make it read without bounds refused:
    pax and GNU long-name headers are read whole into memory (at most `_MAX_EXTENSION_HEADER`
    here) and recursively (at most `_MAX_EXTENSION_CHAIN` in a row); GNU sparse maps grow a list
    per block (sparse members are refused: weights are never sparse)."""

    _EXTENSIONS = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )

    def _proc_member(self, tarfile_):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError(f"{self.name!r} is a sparse member")
        if self.type not in self._EXTENSIONS:
            return super()._proc_member(tarfile_)
        if self.size > _MAX_EXTENSION_HEADER:
            raise tarfile.ReadError(f"an extended header of {self.size:,} bytes")
        chain = getattr(tarfile_, "_sdcog_extension_chain", 0) + 1
        if chain > _MAX_EXTENSION_CHAIN:
            raise tarfile.ReadError(f"more than {_MAX_EXTENSION_CHAIN} extended headers in a row")
        tarfile_._sdcog_extension_chain = chain
        try:
            return super()._proc_member(tarfile_)
        finally:
            tarfile_._sdcog_extension_chain = chain - 1

    def _proc_gnusparse_00(self, *args):
        raise tarfile.ReadError("a sparse member")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def is_tar(path: Path) -> bool:
    """Whether the file (or what it decompresses to) starts with a tar header; reads 512 bytes of it."""
    try:
        with path.open("rb") as raw, decompressed(raw) as stream:
            block = stream.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.TarError, *_DECOMPRESSION_ERRORS):
        return False
    return True


@contextmanager
def _tar_members(
    archive: Path, field: str, reference: AdapterReference, limit: int
) -> Iterator[tuple[tarfile.TarFile, Iterator[tarfile.TarInfo]]]:
    """The archive's members, read as a stream front to back (tarfile's stream mode never seeks
    back), its decompressed bytes at most `limit` and its members at most `MAX_TAR_MEMBERS`. A
    damaged archive is an InputError naming `field`."""
    try:
        with archive.open("rb") as raw, decompressed(raw) as stream:
            unpacked = _Unpacked(stream, limit, field, reference)
            with tarfile.open(fileobj=unpacked, mode="r|", tarinfo=CheckedTarInfo) as tar:

                def members() -> Iterator[tarfile.TarInfo]:
                    for count, member in enumerate(tar, 1):
                        if count > MAX_TAR_MEMBERS:
                            raise InputError(
                                field,
                                f"{reference.name}: its archive has more than {MAX_TAR_MEMBERS} members; "
                                "a model's weights archive has a few",
                            )
                        yield member

                yield tar, members()
    except tarfile.TarError as error:
        message = f"{reference.name}: its archive is damaged or cannot be read ({error})"
        raise InputError(field, message) from error


def safetensors_from_tar(
    kind: AdapterKind, reference: AdapterReference, archive: Path, out: Path, limit: int
) -> Path:
    """The tar's member for `kind` (a Replicate model's weights), copied to `out`, the archive and it
    together at most `limit` bytes. Its `kind.tar_member` is taken as soon as it is met; otherwise
    its only .safetensors file, read in a second pass once the first has seen them all."""
    field = kind.field
    candidates: list[tuple[int, str]] = []
    with _tar_members(archive, field, reference, limit) as (tar, members):
        for index, member in enumerate(members):
            if not (member.isfile() and (member.name.endswith(_SUFFIX) or _is_tar_member(kind, member))):
                continue
            if _is_tar_member(kind, member):  # Replicate's trainers write lora.safetensors and embeddings.pti
                _copy_member(kind, reference, tar, member, archive, out, limit)
                return out
            candidates.append((index, member.name))
    if not candidates:
        raise InputError(field, f"{reference.name}: the archive it points to holds no .safetensors file")
    if len(candidates) > 1:
        names = ", ".join(_shown(name) for _, name in candidates[:5])
        raise InputError(field, f"{reference.name}: its archive has several .safetensors files ({names})")
    with _tar_members(archive, field, reference, limit) as (tar, members):
        for index, member in enumerate(members):
            if index == candidates[0][0]:
                _copy_member(kind, reference, tar, member, archive, out, limit)
                return out
    raise InputError(field, f"{reference.name}: its archive changed between two readings")


def _is_tar_member(kind: AdapterKind, member: tarfile.TarInfo) -> bool:
    return Path(member.name).name == kind.tar_member


def _shown(name: str) -> str:
    """A member's name for a message: an archive's names may be long, up to a pax header's size."""
    return name if len(name) <= 80 else name[:77] + "..."


def _copy_member(
    kind: AdapterKind,
    reference: AdapterReference,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    archive: Path,
    out: Path,
    limit: int,
) -> None:
    """Copy `member` to `out`, refused from its header when the archive and it would be over `limit`."""
    size = archive.stat().st_size
    room = limit - size
    what = (
        f"its archive ({size / 1e6:.3g} MB) and the {_shown(member.name)} in it "
        f"({member.size / 1e6:.3g} MB) would take {(size + member.size) / 1e6:.3g} MB on disk, over"
    )
    if member.size > room:
        raise too_large(kind.field, reference, what, limit)
    source = tar.extractfile(member)
    written = 0
    with out.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > room:  # tarfile reads no more than the header's size: a second guard
                raise too_large(kind.field, reference, what, limit)
            sink.write(chunk)


def trained_embeddings_from_tar(
    kind: AdapterKind, reference: AdapterReference, archive: Path, out: Path, limit: int
) -> str | None:
    """A trained LoRA's companion: the trigger word's embeddings (`embeddings.pti`), copied to `out`
    when the tar holds them, and the word they stand for (from `special_params.json`: the key whose
    value is new tokens, `<s0><s1>`; else TOK, Replicate's default). None: the tar has none."""
    word, found = None, False
    with _tar_members(archive, kind.field, reference, limit) as (tar, members):
        for member in members:
            name = Path(member.name).name
            if not member.isfile():
                continue
            if name == EMBEDDING.tar_member and not found:
                _copy_member(kind, reference, tar, member, archive, out, limit)
                found = True
            elif name == SPECIAL_PARAMS and member.size <= _MAX_SPECIAL_PARAMS:
                word = _trigger_word(tar.extractfile(member).read())
    if not found:
        return None
    return word or DEFAULT_TRIGGER_WORD


def _trigger_word(data: bytes) -> str | None:
    try:
        params = json.loads(data)
    except ValueError:
        return None
    if not isinstance(params, dict):
        return None
    words = [key for key, value in params.items() if isinstance(value, str) and _TOKENS.fullmatch(value)]
    return words[0] if len(words) == 1 and isinstance(words[0], str) else None
