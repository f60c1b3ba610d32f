"""LoRA and embedding files fetched for requests, kept on disk by content hash; least recently used out first.

A reference (see `sdcog.fetch.adapter_references`) is fetched once: the file is stored as
`<sha256>.safetensors`, and `references.json` maps each reference to its hash, so the next request
naming it (or another reference to the same bytes) reads the disk. When the files pass the size
limit, the least recently used are deleted (never one the current request uses).

Only safetensors files are kept: anything else (a pickled `.ckpt`/`.bin`, an HTML error page) is
refused before it is stored, so nothing but tensors is ever loaded. A Replicate model's weights
arrive as a tar (plain, gzip, bzip2 or xz): its LoRA (`lora.safetensors`) or its embeddings
(`embeddings.pti`, safetensors too) is copied out and stored; nothing else of it reaches the disk.
An archive is hostile until read: its decompressed stream is counted as it is read and refused
past the limit (so is a member whose header says it is larger), it may have at most
`MAX_TAR_MEMBERS` members, and one level only is unpacked (a member that is itself an archive is
not a safetensors file, so it is refused). Everything a reference writes to disk, its download and
the member copied out of it together, is at most the limit; a failed fetch leaves nothing behind,
and a stored file that then fails to load (not a LoRA, another model family) is forgotten: see
`AdapterFile.reject`.

Operator settings:
- `SDCOG_ADAPTER_CACHE`: the directory (default `~/.cache/sdcog/adapters`);
- `SDCOG_ADAPTER_CACHE_GB` (default 20): the most the files may take;
- `SDCOG_MAX_ADAPTER_MB` (default 2000): the most one reference may write to disk (its download,
  plus the file unpacked from an archive), and the most an archive may decompress to.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sdcog.errors import InputError
from sdcog.fetch.adapter_references import EMBEDDING, LORA, AdapterKind, AdapterReference, resolve_download
from sdcog.fetch.input_files import decode_data_uri, fetch_url_to
from sdcog.model.safetensors_files import NotSafetensors, read_header, sha256_of
from sdcog.resolve.request import EmbeddingRequest, LoraRequest

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SDCOG_ADAPTER_CACHE"
CACHE_GB_ENV = "SDCOG_ADAPTER_CACHE_GB"
MAX_ADAPTER_MB_ENV = "SDCOG_MAX_ADAPTER_MB"
DEFAULT_CACHE_GB = 20
DEFAULT_MAX_ADAPTER_MB = 2000
INDEX_FILE = "references.json"
TOKEN_ENVS = {"huggingface": "HF_TOKEN", "replicate": "REPLICATE_API_TOKEN"}
_SUFFIX = ".safetensors"
MAX_TAR_MEMBERS = 1000
"""The most members a weights archive may have (Replicate's hold a handful)."""
_MAX_EXTENSION_HEADER = 1 << 20
"""The largest pax or GNU long-name header read (tarfile reads one whole into memory)."""
_MAX_EXTENSION_CHAIN = 8
"""The most such headers in a row before a member (tarfile reads each chain recursively)."""
_CHUNK = 1 << 20


def adapter_tokens(
    huggingface: str | None = None, replicate: str | None = None, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The token for each kind of reference: the request's own (a `cog.Secret` input), else the
    server's environment's (HF_TOKEN for Hugging Face, REPLICATE_API_TOKEN for Replicate)."""
    given = {"huggingface": huggingface, "replicate": replicate}
    tokens = {kind: given[kind] or environ.get(name) for kind, name in TOKEN_ENVS.items()}
    return {kind: token for kind, token in tokens.items() if token}


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    sha256: str
    name: str
    """The reference's short name (for logs and metadata)."""
    stored_by: AdapterCache | None = dataclasses.field(default=None, compare=False, repr=False)
    """The cache whose fetch for this request stored the file (None: it was on disk before)."""

    def reject(self) -> None:
        """The file failed to load (not a LoRA or an embedding for this model): the cache forgets it
        if this request stored it, so that a failed request leaves nothing behind. A file that was
        on disk before stays: another reference may use it."""
        if self.stored_by is not None:
            self.stored_by.forget(self.sha256)


class AdapterCache:
    def __init__(self, root: Path, max_bytes: int, max_file_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.downloads = 0
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._index: dict[str, str] = json.loads((self.root / INDEX_FILE).read_text())
        except (OSError, ValueError):
            self._index = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> AdapterCache:
        root = environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sdcog" / "adapters"
        return cls(
            Path(root),
            max_bytes=int(float(environ.get(CACHE_GB_ENV) or DEFAULT_CACHE_GB) * 1e9),
            max_file_bytes=int(float(environ.get(MAX_ADAPTER_MB_ENV) or DEFAULT_MAX_ADAPTER_MB) * 1e6),
        )

    def fetch_loras(
        self, loras: Sequence[LoraRequest], tokens: Mapping[str, str] | None = None
    ) -> list[tuple[AdapterFile, float]]:
        """Each LoRA's file (fetched or from the disk) with its scale."""
        files = self.fetch_all(LORA, [lora.reference for lora in loras], tokens)
        return [(file, lora.scale) for file, lora in zip(files, loras, strict=True)]

    def fetch_embeddings(
        self,
        embeddings: Sequence[EmbeddingRequest],
        tokens: Mapping[str, str] | None = None,
        keep: frozenset[str] = frozenset(),
    ) -> list[tuple[AdapterFile, str | None]]:
        """Each embedding's file with the word the request gave it (None: the file's own)."""
        files = self.fetch_all(EMBEDDING, [embedding.reference for embedding in embeddings], tokens, keep)
        return [(file, embedding.token) for file, embedding in zip(files, embeddings, strict=True)]

    def fetch_all(
        self,
        kind: AdapterKind,
        references: Sequence[AdapterReference],
        tokens: Mapping[str, str] | None = None,
        keep: frozenset[str] = frozenset(),
    ) -> list[AdapterFile]:
        """The references' files, none evicted by another's arrival (nor those in `keep`). `tokens`
        (see `adapter_tokens`, its default) go to their own hosts only."""
        tokens = adapter_tokens() if tokens is None else tokens
        files: list[AdapterFile] = []
        for reference in references:
            token = tokens.get(reference.kind)
            files.append(self.fetch(kind, reference, token, keep | {file.sha256 for file in files}))
        return files

    def path_for(self, sha256: str) -> Path:
        return self.root / f"{sha256}{_SUFFIX}"

    def fetch(
        self,
        kind: AdapterKind,
        reference: AdapterReference,
        token: str | None = None,
        keep: frozenset[str] = frozenset(),
    ) -> AdapterFile:
        """The reference's file, from the disk when it was fetched before; `keep`: hashes not to evict."""
        key = f"{kind.field}|{_index_key(reference)}"  # the file taken from a tar or repo depends on the kind
        sha256 = self._index.get(key)
        if sha256 and self.path_for(sha256).is_file():
            os.utime(self.path_for(sha256))  # most recently used
            return AdapterFile(self.path_for(sha256), sha256, reference.name)
        started = time.perf_counter()
        sha256, size, stored = self._download(kind, reference, token)
        self.downloads += 1
        self._index[key] = sha256
        log.info(
            "%s: fetched %s (%.1f MB, sha256 %s) in %.1f s",
            kind.field,
            reference.name,
            size / 1e6,
            sha256[:12],
            time.perf_counter() - started,
        )
        self._evict(keep | {sha256})  # also writes the index, with this reference in it
        return AdapterFile(self.path_for(sha256), sha256, reference.name, self if stored else None)

    def forget(self, sha256: str) -> None:
        """Remove the file with this hash and every reference to it from the index."""
        self.path_for(sha256).unlink(missing_ok=True)
        self._index = {key: sha for key, sha in self._index.items() if sha != sha256}
        self._write_index()
        log.info("adapter cache: removed %s, which failed to load", self.path_for(sha256).name)

    def _download(
        self, kind: AdapterKind, reference: AdapterReference, token: str | None
    ) -> tuple[str, int, bool]:
        """The file's hash and size, and whether it is new on disk (False: the same bytes were there)."""
        field, limit = kind.field, self.max_file_bytes
        with tempfile.TemporaryDirectory(dir=self.root, prefix="incoming-") as incoming:
            body = Path(incoming) / "body"
            with body.open("wb") as sink:
                if reference.kind == "data":
                    sink.write(decode_data_uri(field, reference.location, limit, MAX_ADAPTER_MB_ENV))
                else:
                    url = resolve_download(kind, reference, token)
                    headers = {"Authorization": f"Bearer {token}"} if token else None
                    fetch_url_to(sink, field, url, limit, headers=headers, setting=MAX_ADAPTER_MB_ENV)
            if _is_tar(body):
                body = _safetensors_from_tar(kind, reference, body, Path(incoming) / "member", limit)
            _check_safetensors(field, reference, body)
            sha256 = sha256_of(body)
            size = body.stat().st_size
            stored = not self.path_for(sha256).exists()
            os.replace(body, self.path_for(sha256))
        return sha256, size, stored

    def _evict(self, keep: frozenset[str]) -> None:
        files = sorted(self.root.glob(f"*{_SUFFIX}"), key=lambda path: path.stat().st_mtime)
        total = sum(path.stat().st_size for path in files)
        for path in files:
            if total <= self.max_bytes:
                break
            if path.stem in keep:
                continue
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            log.info("adapter cache: removed %s, the least recently used, to stay under the limit", path.name)
        self._index = {key: sha for key, sha in self._index.items() if self.path_for(sha).is_file()}
        self._write_index()

    def _write_index(self) -> None:
        partial = self.root / f"{INDEX_FILE}.partial"
        partial.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        os.replace(partial, self.root / INDEX_FILE)


def _index_key(reference: AdapterReference) -> str:
    if reference.kind == "data":
        return "data:" + hashlib.sha256(reference.location.encode()).hexdigest()
    return f"{reference.kind}:{reference.location}:{reference.file or ''}@{reference.revision or ''}"


def _check_safetensors(field: str, reference: AdapterReference, path: Path) -> None:
    """A safetensors file: an 8-byte header length, then a JSON header that fits the file."""
    try:
        read_header(path)
    except NotSafetensors as error:
        raise InputError(
            field,
            f"{reference.name}: what {reference.text[:80]!r} points to is not a safetensors file; only "
            "safetensors weights are loaded (pickled .ckpt, .pt and .bin files never are)",
        ) from error


def _too_large(field: str, reference: AdapterReference, what: str, limit: int) -> InputError:
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


def _decompressed(raw: BinaryIO) -> BinaryIO:
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
            raise _too_large(self.field, self.reference, "its archive decompresses past", self.limit)
        return data


class _CheckedTarInfo(tarfile.TarInfo):
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


def _is_tar(path: Path) -> bool:
    """Whether the file (or what it decompresses to) starts with a tar header; reads 512 bytes of it."""
    try:
        with path.open("rb") as raw, _decompressed(raw) as stream:
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
        with archive.open("rb") as raw, _decompressed(raw) as stream:
            unpacked = _Unpacked(stream, limit, field, reference)
            with tarfile.open(fileobj=unpacked, mode="r|", tarinfo=_CheckedTarInfo) as tar:

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


def _safetensors_from_tar(
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
        raise _too_large(kind.field, reference, what, limit)
    source = tar.extractfile(member)
    written = 0
    with out.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > room:  # tarfile reads no more than the header's size: a second guard
                raise _too_large(kind.field, reference, what, limit)
            sink.write(chunk)
