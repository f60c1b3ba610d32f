"""LoRA and embedding files fetched for requests, kept on disk by content hash; least recently used out first.

A reference (see `sdcog.fetch.adapter_references`) is fetched once: the file is stored as
`<sha256>.safetensors`, and `references.json` maps each reference to its hash, so the next request
naming it (or another reference to the same bytes) reads the disk. When the files pass the size
limit, the least recently used are deleted (never one the current request uses).

Only safetensors files are kept: anything else (a pickled `.ckpt`/`.bin`, an HTML error page) is
refused before it is stored, so nothing but tensors is ever loaded. A Replicate model's weights
arrive as a tar, from which `sdcog.fetch.adapter_archives` copies out its LoRA (`lora.safetensors`)
or its embeddings (`embeddings.pti`, safetensors too). A trained LoRA's tar (this model's `cog train`,
or Replicate's trainers) may hold the trigger word's embeddings beside its LoRA: given as a LoRA,
those come with it, under the word its `special_params.json` names (`FetchedAdapters.embeddings`),
so that `a photo of TOK` draws the trained subject with no other input. Everything a reference
writes to disk, its download and the member copied out of it together, is at most the limit; a
failed fetch leaves nothing behind, and a stored file that then fails to load (not a LoRA, another
model family) is forgotten: see `AdapterFile.reject`.

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
from sdcog.fetch.adapter_archives import (
    MAX_ADAPTER_MB_ENV,
    is_tar,
    safetensors_from_tar,
    trained_embeddings_from_tar,
)
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
COMPANIONS_FILE = "trained-embeddings.json"
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
    trained_embeddings: tuple[str, str] | None = dataclasses.field(default=None, compare=False)
    """A trained LoRA's tar's embeddings that came with it: (their sha256, their word)."""

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
    controlnets: tuple = ()
    """The request's ControlNets, loaded (`sdcog.generate.controlnets.LoadedControlNet`), in slot
    order; their cache holds and releases their files itself."""

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
        self._index: dict[str, str] = _read_json(self.root / INDEX_FILE)
        self._companions: dict[str, list[str]] = _read_json(self.root / COMPANIONS_FILE)
        """By index key: [the embeddings' sha256, their word], for a trained LoRA's tar."""

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
            trained = [self._companion(lora.file) for lora in loras]
            embeddings = [embedding for embedding in trained if embedding is not None]
            keep = frozenset(lora.file.sha256 for lora in loras) | {e.file.sha256 for e in embeddings}
            embeddings += self.fetch_embeddings(request.embeddings, tokens, keep=keep)
            adapters = FetchedAdapters(loras=tuple(loras), embeddings=tuple(embeddings))
            self._hold(adapters.sha256s)
        return adapters

    def fetch_held(
        self, kind: AdapterKind, reference: AdapterReference, token: str | None, keep: frozenset[str]
    ) -> AdapterFile:
        """One reference's file, held against eviction until `release_files` (as `fetch_for` holds)."""
        with self._lock:
            file = self.fetch(kind, reference, token, keep)
            self._hold([file.sha256])
        return file

    def _hold(self, sha256s: Sequence[str]) -> None:
        with self._in_use_lock:
            self._in_use.update(sha256s)

    def release(self, adapters: FetchedAdapters) -> None:
        """The request that fetched `adapters` is done with them: they may be evicted again."""
        self.release_files(adapters.sha256s)

    def release_files(self, sha256s: Sequence[str]) -> None:
        with self._in_use_lock:  # not the fetch lock: the generation thread calls this
            self._in_use.subtract(sha256s)
            self._in_use = +self._in_use  # drop the zeros

    def fetch_loras(
        self, loras: Sequence[LoraRequest], tokens: Mapping[str, str] | None = None
    ) -> list[FetchedLora]:
        """Each LoRA's file (fetched or from the disk) with its scale."""
        fetched: list[FetchedLora] = []
        for lora in loras:  # each with the input that named it, for its errors
            kind = LORA if lora.field == LORA.field else dataclasses.replace(LORA, field=lora.field)
            keep = frozenset(done.file.sha256 for done in fetched)
            (file,) = self.fetch_all(kind, [lora.reference], tokens, keep)
            fetched.append(FetchedLora(file, lora.scale))
        return fetched

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
        if sha256 and self._on_disk(key):
            for path in (self.path_for(sha256), *self._companion_paths(key)):
                os.utime(path)  # most recently used
            return AdapterFile(self.path_for(sha256), sha256, reference.name, None, self._companion_of(key))
        started = time.perf_counter()
        sha256, size, stored, companion = self._download(kind, reference, token)
        self.downloads += 1
        self._index[key] = sha256
        if companion is None:
            self._companions.pop(key, None)
        else:
            self._companions[key] = companion
            keep = keep | {companion[0]}
        log.info(
            "%s: fetched %s (%.1f MB, sha256 %s) in %.1f s",
            kind.field,
            reference.name,
            size / 1e6,
            sha256[:12],
            time.perf_counter() - started,
        )
        self._evict(keep | {sha256})  # also writes the index, with this reference in it
        stored_by = self if stored else None
        return AdapterFile(self.path_for(sha256), sha256, reference.name, stored_by, self._companion_of(key))

    def _on_disk(self, key: str) -> bool:
        """The reference's file is stored, and so are the trained embeddings that came with it."""
        sha256 = self._index.get(key)
        paths = [self.path_for(sha256), *self._companion_paths(key)] if sha256 else []
        return bool(paths) and all(path.is_file() for path in paths)

    def _companion_of(self, key: str) -> tuple[str, str] | None:
        companion = self._companions.get(key)
        return (companion[0], companion[1]) if companion else None

    def _companion_paths(self, key: str) -> list[Path]:
        companion = self._companion_of(key)
        return [self.path_for(companion[0])] if companion else []

    def _companion(self, lora: AdapterFile) -> FetchedEmbedding | None:
        """The trigger word's embeddings that came in the LoRA's tar, under their word."""
        if lora.trained_embeddings is None:
            return None
        sha256, word = lora.trained_embeddings
        file = AdapterFile(self.path_for(sha256), sha256, f"{lora.name} ({word})", lora.stored_by)
        return FetchedEmbedding(file, word)

    def forget(self, sha256: str) -> None:
        """Remove the file with this hash and every reference to it from the index."""
        self.path_for(sha256).unlink(missing_ok=True)
        self._index = {key: sha for key, sha in self._index.items() if sha != sha256}
        self._forget_companions()
        self._write_index()
        log.info("adapter cache: removed %s, which failed to load", self.path_for(sha256).name)

    def _forget_companions(self) -> None:
        """Drop the trained embeddings of references no longer indexed, and references whose
        trained embeddings are gone (fetched again next time)."""
        self._index = {key: sha for key, sha in self._index.items() if self._on_disk(key)}
        self._companions = {key: item for key, item in self._companions.items() if key in self._index}

    def _download(
        self, kind: AdapterKind, reference: AdapterReference, token: str | None
    ) -> tuple[str, int, bool, list[str] | None]:
        """The file's hash and size, whether it is new on disk (False: the same bytes were there),
        and a trained LoRA's tar's embeddings stored beside it ([sha256, word]), if any."""
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
            companion = None
            if is_tar(body):
                archive = body
                body = safetensors_from_tar(kind, reference, archive, Path(incoming) / "member", limit)
                if kind.tar_member == LORA.tar_member:
                    companion = self._trained_embeddings(
                        kind, reference, archive, Path(incoming) / "embeddings"
                    )
            _check_safetensors(field, reference, body)
            sha256 = sha256_of(body)
            size = body.stat().st_size
            stored = not self.path_for(sha256).exists()
            os.replace(body, self.path_for(sha256))
        return sha256, size, stored, companion

    def _trained_embeddings(
        self, kind: AdapterKind, reference: AdapterReference, archive: Path, out: Path
    ) -> list[str] | None:
        """A trained LoRA's tar's embeddings, stored beside it: [their sha256, their word], or None.
        Refusals name `kind.field` (lora_weights, or replicate_weights)."""
        word = trained_embeddings_from_tar(kind, reference, archive, out, self.max_file_bytes)
        if word is None:
            return None
        _check_safetensors(kind.field, reference, out)
        sha256 = sha256_of(out)
        os.replace(out, self.path_for(sha256))
        log.info("%s: %s holds the embeddings of its trigger word %s", kind.field, reference.name, word)
        return [sha256, word]

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
        self._forget_companions()
        self._write_index()

    def _write_index(self) -> None:
        for name, content in ((INDEX_FILE, self._index), (COMPANIONS_FILE, self._companions)):
            partial = self.root / f"{name}.partial"
            partial.write_text(json.dumps(content, indent=1, sort_keys=True))
            os.replace(partial, self.root / name)


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


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
