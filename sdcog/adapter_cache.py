"""LoRA and embedding files fetched for requests, kept on disk by content hash; least recently used out first.

A reference (see `sdcog.adapter_references`) is fetched once: the file is stored as
`<sha256>.safetensors`, and `references.json` maps each reference to its hash, so the next request
naming it (or another reference to the same bytes) reads the disk. When the files pass the size
limit, the least recently used are deleted (never one the current request uses).

Only safetensors files are kept: anything else (a pickled `.ckpt`/`.bin`, an HTML error page) is
refused before it is stored, so nothing but tensors is ever loaded. A Replicate model's weights
arrive as a tar: its LoRA (`lora.safetensors`) or its embeddings (`embeddings.pti`, safetensors too)
is stored, nothing of it is unpacked to disk.

Operator settings:
- `SDCOG_ADAPTER_CACHE`: the directory (default `~/.cache/sdcog/adapters`);
- `SDCOG_ADAPTER_CACHE_GB` (default 20): the most the files may take;
- `SDCOG_MAX_ADAPTER_MB` (default 2000): the largest file accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdcog.adapter_references import EMBEDDING, LORA, AdapterKind, AdapterReference, resolve_download
from sdcog.errors import InputError
from sdcog.input_files import decode_data_uri, fetch_url_to
from sdcog.request import EmbeddingRequest, LoraRequest

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SDCOG_ADAPTER_CACHE"
CACHE_GB_ENV = "SDCOG_ADAPTER_CACHE_GB"
MAX_ADAPTER_MB_ENV = "SDCOG_MAX_ADAPTER_MB"
DEFAULT_CACHE_GB = 20
DEFAULT_MAX_ADAPTER_MB = 2000
INDEX_FILE = "references.json"
TOKEN_ENVS = {"huggingface": "HF_TOKEN", "replicate": "REPLICATE_API_TOKEN"}
_SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header


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
        sha256, size = self._download(kind, reference, token)
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
        return AdapterFile(self.path_for(sha256), sha256, reference.name)

    def _download(self, kind: AdapterKind, reference: AdapterReference, token: str | None) -> tuple[str, int]:
        field = kind.field
        with tempfile.TemporaryDirectory(dir=self.root, prefix="incoming-") as incoming:
            body = Path(incoming) / "body"
            with body.open("wb") as sink:
                if reference.kind == "data":
                    sink.write(decode_data_uri(field, reference.location, self.max_file_bytes))
                else:
                    url = resolve_download(kind, reference, token)
                    headers = {"Authorization": f"Bearer {token}"} if token else None
                    fetch_url_to(sink, field, url, self.max_file_bytes, headers=headers)
            if tarfile.is_tarfile(body):
                body = _safetensors_from_tar(kind, reference, body, Path(incoming) / "member")
            _check_safetensors(field, reference, body)
            sha256 = _sha256(body)
            size = body.stat().st_size
            os.replace(body, self.path_for(sha256))
        return sha256, size

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safetensors(field: str, reference: AdapterReference, path: Path) -> None:
    """A safetensors file: an 8-byte header length, then a JSON header that fits the file."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = file.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
        try:
            fits = 1 < length <= min(_MAX_HEADER, size - 8)
            valid = fits and isinstance(json.loads(file.read(length)), dict)
        except (ValueError, UnicodeDecodeError):
            valid = False
    if not valid:
        raise InputError(
            field,
            f"{reference.name}: what {reference.text[:80]!r} points to is not a safetensors file; only "
            "safetensors weights are loaded (pickled .ckpt, .pt and .bin files never are)",
        )


def _safetensors_from_tar(kind: AdapterKind, reference: AdapterReference, archive: Path, out: Path) -> Path:
    """The tar's member for `kind` (a Replicate model's weights), copied out without unpacking."""
    field = kind.field
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile() and (m.name.endswith(_SUFFIX) or Path(m.name).name == kind.tar_member)
        ]
        if not members:
            raise InputError(field, f"{reference.name}: the archive it points to holds no .safetensors file")
        # Replicate's trainers write lora.safetensors and embeddings.pti; otherwise the only one.
        preferred = [m for m in members if Path(m.name).name == kind.tar_member]
        if not preferred and len(members) > 1:
            names = ", ".join(m.name for m in members[:5])
            raise InputError(field, f"{reference.name}: its archive has several .safetensors files ({names})")
        member = (preferred or members)[0]
        source = tar.extractfile(member)
        with out.open("wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
    return out
