"""LoRA and embedding files fetched for requests, kept on disk by content hash; least recently used out first.

A reference (see `sdcog.fetch.adapter_references`) is fetched once: the file is stored as
`<sha256>.safetensors`, and `references.json` maps each reference to its hash, so the next request
naming it (or another reference to the same bytes) reads the disk. When the files pass the size
limit, the least recently used are deleted (never one the current request uses).

Only safetensors files are kept: anything else (a pickled `.ckpt`/`.bin`, an HTML error page) is
refused before it is stored, so nothing but tensors is ever loaded. A Replicate model's weights
arrive as a tar, from which `sdcog.fetch.adapter_archives` copies out its LoRA (`lora.safetensors`)
or its embeddings (`embeddings.pti`, safetensors too). Everything a reference writes to disk, its
download and the member copied out of it together, is at most the limit; a failed fetch leaves
nothing behind, and a stored file that then fails to load (not a LoRA, another model family) is
forgotten: see `AdapterFile.reject`.

Operator settings:
- `SDCOG_ADAPTER_CACHE`: the directory (default `~/.cache/sdcog/adapters`);
- `SDCOG_ADAPTER_CACHE_GB` (default 20): the most the files may take;
- `SDCOG_MAX_ADAPTER_MB` (default 2000): the most one reference may write to disk (its download,
  plus the file unpacked from an archive), and the most an archive may decompress to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sdcog.errors import InputError
from sdcog.fetch.adapter_archives import MAX_ADAPTER_MB_ENV, is_tar, safetensors_from_tar
from sdcog.fetch.adapter_references import EMBEDDING, LORA, AdapterKind, AdapterReference, resolve_download
from sdcog.fetch.input_files import decode_data_uri, fetch_url_to
from sdcog.model.safetensors_files import NotSafetensors, read_header, sha256_of
from sdcog.resolve.request import EmbeddingRequest, GenerationRequest, LoraRequest

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SDCOG_ADAPTER_CACHE"
CACHE_GB_ENV = "SDCOG_ADAPTER_CACHE_GB"
DEFAULT_CACHE_GB = 20
DEFAULT_MAX_ADAPTER_MB = 2000
INDEX_FILE = "references.json"
TOKEN_ENVS = {"huggingface": "HF_TOKEN", "replicate": "REPLICATE_API_TOKEN"}
_SUFFIX = ".safetensors"


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


class FetchedLora(NamedTuple):
    file: AdapterFile
    scale: float


class FetchedEmbedding(NamedTuple):
    file: AdapterFile
    token: str | None
    """The word the request gave it; None: the file's own name."""


@dataclass(frozen=True)
class FetchedAdapters:
    """What a request's `lora_weights` and `embeddings` name, on disk, in the request's order."""

    loras: tuple[FetchedLora, ...] = ()
    embeddings: tuple[FetchedEmbedding, ...] = ()

    @property
    def sha256s(self) -> list[str]:
        return [lora.file.sha256 for lora in self.loras] + [e.file.sha256 for e in self.embeddings]


class AdapterCache:
    def __init__(self, root: Path, max_bytes: int, max_file_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.downloads = 0
        self._lock = threading.RLock()  # concurrent predictions fetch from threads
        self._in_use_lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        """Hashes of files fetched for requests not done yet (see `release`): never evicted."""
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

    def fetch_for(
        self, request: GenerationRequest, tokens: Mapping[str, str] | None = None
    ) -> FetchedAdapters:
        """Every LoRA and embedding file the request names, none evicting another, and none
        evicted by other requests' fetches until `release` (requests wait in a queue between)."""
        with self._lock:
            loras = self.fetch_loras(request.loras, tokens)
            embeddings = self.fetch_embeddings(
                request.embeddings, tokens, keep=frozenset(lora.file.sha256 for lora in loras)
            )
            adapters = FetchedAdapters(loras=tuple(loras), embeddings=tuple(embeddings))
            with self._in_use_lock:
                self._in_use.update(adapters.sha256s)
        return adapters

    def release(self, adapters: FetchedAdapters) -> None:
        """The request that fetched `adapters` is done with them: they may be evicted again."""
        with self._in_use_lock:  # not the fetch lock: the generation thread calls this
            self._in_use.subtract(adapters.sha256s)
            self._in_use = +self._in_use  # drop the zeros

    def fetch_loras(
        self, loras: Sequence[LoraRequest], tokens: Mapping[str, str] | None = None
    ) -> list[FetchedLora]:
        """Each LoRA's file (fetched or from the disk) with its scale."""
        files = self.fetch_all(LORA, [lora.reference for lora in loras], tokens)
        return [FetchedLora(file, lora.scale) for file, lora in zip(files, loras, strict=True)]

    def fetch_embeddings(
        self,
        embeddings: Sequence[EmbeddingRequest],
        tokens: Mapping[str, str] | None = None,
        keep: frozenset[str] = frozenset(),
    ) -> list[FetchedEmbedding]:
        """Each embedding's file with the word the request gave it (None: the file's own)."""
        files = self.fetch_all(EMBEDDING, [embedding.reference for embedding in embeddings], tokens, keep)
        return [FetchedEmbedding(file, asked.token) for file, asked in zip(files, embeddings, strict=True)]

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
            if is_tar(body):
                body = safetensors_from_tar(kind, reference, body, Path(incoming) / "member", limit)
            _check_safetensors(field, reference, body)
            sha256 = sha256_of(body)
            size = body.stat().st_size
            stored = not self.path_for(sha256).exists()
            os.replace(body, self.path_for(sha256))
        return sha256, size, stored

    def _evict(self, keep: frozenset[str]) -> None:
        with self._in_use_lock:
            keep = keep | set(self._in_use)
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
