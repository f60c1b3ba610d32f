"""Single-file checkpoints for `script/download-weights`: what a reference names, the download (with
resume for plain URLs), its verification, and the family's configs fetched beside it.

A reference is one of:
- `owner/repo`: a diffusers pipeline when the repo has model_index.json (download.py fetches it
  with `download_pipeline`), else the one checkpoint `.safetensors` at the repo's root;
- `owner/repo/<path>.safetensors`, or `https://huggingface.co/owner/repo/(resolve|blob)/<rev>/<path>`
  (read at HF_ENDPOINT when it is set): one file of a hub repo, fetched with huggingface_hub (HF_TOKEN);
- any other `https://` URL (Civitai...; `http://` on loopback only): fetched with httpx, with
  `Authorization: Bearer $DOWNLOAD_TOKEN` (or `--token`) when set, into `.<name>.partial`, which a
  rerun resumes with a Range request;
- a local `.safetensors` file: its configs are fetched beside it (the file is not copied).

Pickles (`.ckpt`, `.pt`, `.bin`..., or such bytes under any name) are refused and not kept. What
was downloaded is verified (the safetensors header parses and the file ends where its header says;
the sha256 matches the hub's LFS sha256, or `--sha256`); a file that fails is deleted. Then
`inspect_checkpoint` says what it is, and the configs and tokenizers (no weights) of the repository
that fits it are fetched into the same directory. sdcog-source.json says `"complete": false` until
the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx

from sdcog.fetch.adapter_references import hf_endpoint
from sdcog.model.checkpoints import (
    FEW_STEP_SETTING,
    PICKLE_SUFFIXES,
    PREDICTION_SETTING,
    VAE_SUFFIX,
    is_pickle_start,
)
from sdcog.model.safetensors_files import (
    MAX_HEADER_BYTES,
    NotSafetensors,
    header_length,
    read_header,
    sha256_of,
)
from sdcog.model.weights import (
    DEFAULT_WEIGHTS_DIR,
    SOURCE_FILE,
    WeightsError,
    component_names,
    read_source,
)

CHECKPOINT_SUFFIX = ".safetensors"
DOWNLOAD_TOKEN_ENV = "DOWNLOAD_TOKEN"
NOT_CONFIGS = ("safety_checker", "feature_extractor")
"""Folders of a config repository left out: the checkpoint has no safety checker."""
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
SECRET_PARAMETERS = ("token", "access_token", "api_key", "apikey", "key")
"""Query parameters dropped from a URL before it is printed or written to sdcog-source.json."""
IGNORED_FILES = ("README.md", ".gitkeep", ".gitignore", ".DS_Store")
MAX_ATTEMPTS = 3
"""GETs of a plain URL in one run: a connection lost after some bytes is resumed at once."""
_CHUNK = 1 << 20
_HUB_PATH = re.compile(r"^/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")


class DownloadError(RuntimeError):
    """A download refused or failed; the message says what is (not) kept and what to run."""


@dataclass(frozen=True)
class Options:
    hf_token: str | None = None
    url_token: str | None = None
    sha256: str | None = None
    prediction_type: str | None = None
    few_step: str | None = None

    def declarations(self) -> dict[str, str]:
        declared = {"prediction_type": self.prediction_type, "few_step": self.few_step}
        return {key: value for key, value in declared.items() if value}

    def environ(self) -> dict[str, str]:
        """The declarations as inspect_checkpoint's settings."""
        names = {"prediction_type": PREDICTION_SETTING, "few_step": FEW_STEP_SETTING}
        return {names[key]: value for key, value in self.declarations().items()}


# -- references --


@dataclass(frozen=True)
class PipelineRepo:
    repo: str
    revision: str | None


@dataclass(frozen=True)
class HubCheckpoint:
    repo: str
    path: str
    revision: str | None = None
    sha256: str | None = None
    """The hub's LFS sha256 (None until the repo is listed, or for a file outside LFS)."""
    size: int | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class UrlCheckpoint:
    url: str


@dataclass(frozen=True)
class LocalCheckpoint:
    path: Path


Reference = PipelineRepo | HubCheckpoint | UrlCheckpoint | LocalCheckpoint


def redact(url: str) -> str:
    """The URL without token-like query parameters (they are secrets)."""
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in SECRET_PARAMETERS
    ]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def pickle_refusal(name: str) -> DownloadError:
    return DownloadError(
        f"{name} is a pickle checkpoint: loading one runs whatever code it holds, so it is never "
        "downloaded or loaded here (nothing was kept). Download the .safetensors version most model "
        "pages also publish."
    )


def hub_parts(url: str) -> tuple[str, str, str] | None:
    """(repo, revision, path) of a hub file URL (huggingface.co, hf.co or HF_ENDPOINT), else None."""
    parts = urlsplit(url)
    endpoint = urlsplit(hf_endpoint())
    on_hub = parts.hostname in HUB_HOSTS or (parts.scheme, parts.netloc) == (endpoint.scheme, endpoint.netloc)
    match = _HUB_PATH.match(parts.path) if on_hub else None
    if match is None:
        return None
    return unquote(match[1]), unquote(match[2]), unquote(match[3])


def parse_reference(reference: str, revision: str | None = None) -> Reference:
    """What `reference` names, before any network call (an `owner/repo` is a PipelineRepo here:
    `resolve_repo` tells a pipeline from a checkpoint repo)."""
    text = reference.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("https", "http"):
            raise DownloadError(f"{reference}: only https:// URLs are downloaded")
        hub = hub_parts(text)
        if hub is not None:
            repo, url_revision, path = hub
            return _hub_file(repo, path, url_revision)
        if parts.hostname in HUB_HOSTS:
            segments = [s for s in parts.path.split("/") if s]
            if len(segments) == 2:  # a repo's page
                return PipelineRepo("/".join(segments), revision)
            raise DownloadError(f"{reference} is not a file of a Hugging Face repo (…/resolve/<rev>/<file>)")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise DownloadError(f"{reference}: use an https:// URL (plain http is only for this machine)")
        name = unquote(parts.path.rsplit("/", 1)[-1])
        if _is_pickle_name(name):
            raise pickle_refusal(name)
        return UrlCheckpoint(text)
    local = Path(text).expanduser()
    if local.is_file():
        if _is_pickle_name(local.name):
            raise pickle_refusal(str(local))
        return LocalCheckpoint(local.resolve())
    segments = [s for s in text.strip("/").split("/") if s]
    if len(segments) == 2:
        return PipelineRepo("/".join(segments), revision)
    if len(segments) > 2:
        return _hub_file("/".join(segments[:2]), "/".join(segments[2:]), revision)
    raise DownloadError(
        f"{reference!r} is not a hub repo (owner/repo), a file of one (owner/repo/<file>.safetensors), "
        "a URL or a local .safetensors file"
    )


def _hub_file(repo: str, path: str, revision: str | None) -> HubCheckpoint:
    if _is_pickle_name(path):
        raise pickle_refusal(f"{repo}/{path}")
    if not path.endswith(CHECKPOINT_SUFFIX):
        raise DownloadError(f"{repo}/{path} is not a .safetensors checkpoint")
    return HubCheckpoint(repo, path, revision)


# -- the hub --


def _hub_error(error: Exception, what: str) -> DownloadError:
    """A huggingface_hub error, worded for the person who ran the script."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return DownloadError(
            f"{what}: the repo is gated: accept its conditions on its page, and set HF_TOKEN"
        )
    if isinstance(error, RepositoryNotFoundError):
        return DownloadError(
            f"{what}: the repo does not exist, or is private or gated (HTTP "
            f"{getattr(error.response, 'status_code', '401')}): check the name, and set HF_TOKEN to a "
            "token that can read it"
        )
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f"{what}: no such revision")
    if isinstance(error, RemoteEntryNotFoundError):
        return DownloadError(f"{what}: no such file in the repo")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DownloadError(f"{what}: {first_line}")


def hub_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError)


def hub_failure(error: BaseException, what: str, then: str) -> DownloadError:
    """A failed hub download: refused (4xx: what to fix), or interrupted (then: what to run)."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    if response is not None and getattr(response, "status_code", 500) < 500:
        return _hub_error(error, what)
    return DownloadError(f"the download of {what} was interrupted ({_first_line(error)}); {then}")


def resolve_repo(repo: str, revision: str | None, token: str | None) -> tuple[Reference, str]:
    """A PipelineRepo when `repo` has model_index.json, else its one root checkpoint; with the commit."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hf_endpoint(), token=token).model_info(
            repo, revision=revision, files_metadata=True
        )
    except hub_errors() as error:
        raise _hub_error(error, repo) from error
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    if "model_index.json" in siblings:
        return PipelineRepo(repo, revision), info.sha
    root = sorted(name for name in siblings if "/" not in name)
    checkpoints = [n for n in root if n.endswith(CHECKPOINT_SUFFIX) and not n.endswith(VAE_SUFFIX)]
    if len(checkpoints) > 1:
        raise DownloadError(
            f"{repo} holds several checkpoints ({', '.join(checkpoints)}); name the one to download: "
            + " or ".join(f"`script/download-weights {repo}/{name}`" for name in checkpoints)
        )
    if not checkpoints:
        pickles = [name for name in siblings if _is_pickle_name(name)]
        deeper = sorted(n for n in siblings if n.endswith(CHECKPOINT_SUFFIX) and "/" in n)
        hint = f" It has {', '.join(deeper[:5])}: name one as {repo}/<file>." if deeper else ""
        if pickles and not deeper:
            hint = f" It has only pickle checkpoints ({', '.join(pickles[:5])}), which are never loaded here."
        raise DownloadError(
            f"{repo} is neither a diffusers pipeline (no model_index.json) nor a repo with a .safetensors "
            f"checkpoint at its root.{hint}"
        )
    return _with_hub_facts(HubCheckpoint(repo, checkpoints[0], revision), siblings), info.sha


def resolve_hub_file(checkpoint: HubCheckpoint, token: str | None) -> tuple[HubCheckpoint, str]:
    """The file with the hub's LFS sha256 and size, and the repo's commit."""
    from huggingface_hub import HfApi

    what = f"{checkpoint.repo}/{checkpoint.path}"
    try:
        info = HfApi(endpoint=hf_endpoint(), token=token).model_info(
            checkpoint.repo, revision=checkpoint.revision, files_metadata=True
        )
    except hub_errors() as error:
        raise _hub_error(error, what) from error
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    if checkpoint.path not in siblings:
        others = sorted(n for n in siblings if n.endswith(CHECKPOINT_SUFFIX))
        raise DownloadError(
            f"{checkpoint.repo} has no file {checkpoint.path}"
            + (f" (its .safetensors files: {', '.join(others[:10])})" if others else "")
        )
    return _with_hub_facts(checkpoint, siblings), info.sha


def _with_hub_facts(checkpoint: HubCheckpoint, siblings: Mapping) -> HubCheckpoint:
    sibling = siblings[checkpoint.path]
    lfs = getattr(sibling, "lfs", None)
    return HubCheckpoint(
        checkpoint.repo,
        checkpoint.path,
        checkpoint.revision,
        sha256=lfs.sha256 if lfs else None,
        size=lfs.size if lfs else getattr(sibling, "size", None),
    )


def _hub_download(checkpoint: HubCheckpoint, commit: str, destination: Path, token: str | None) -> Path:
    """The file in `destination` (at its top level), fetched by huggingface_hub."""
    from huggingface_hub import hf_hub_download

    what = f"{checkpoint.repo}/{checkpoint.path}"
    try:
        fetched = Path(
            hf_hub_download(
                checkpoint.repo,
                checkpoint.path,
                revision=commit,
                local_dir=destination,
                token=token,
                endpoint=hf_endpoint(),
            )
        )
    except hub_errors() as error:
        raise hub_failure(
            error,
            what,
            "nothing of it was kept: run the same command again "
            "(huggingface_hub fetches the file from its start)",
        ) from error
    target = destination / checkpoint.name
    if fetched != target:  # a file in a folder of the repo: served from the top level
        os.replace(fetched, target)
        folder = fetched.parent
        while folder != destination and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- plain URLs --


def _filename(response: httpx.Response) -> str | None:
    """Content-Disposition's file name (its basename), if any."""
    disposition = response.headers.get("Content-Disposition")
    if not disposition:
        return None
    message = Message()
    message["Content-Disposition"] = disposition
    name = message.get_filename()
    return _safe_name(name) if name else None


def _safe_name(name: str) -> str | None:
    name = unquote(name).replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    name = re.sub(r"[^A-Za-z0-9._ +=()\[\]-]", "_", name)
    return name or None


def _url_name(url: str) -> str:
    return _safe_name(urlsplit(url).path.rsplit("/", 1)[-1]) or "checkpoint"


def _checkpoint_name(name: str) -> str:
    if _is_pickle_name(name):
        raise pickle_refusal(name)
    return name if name.endswith(CHECKPOINT_SUFFIX) else name + CHECKPOINT_SUFFIX


def partial_path(destination: Path, url: str) -> Path:
    return destination / f".{_url_name(url)}.partial"


def check_start(path: Path, total: int | None = None, delete: bool = True) -> None:
    """Refuse (deleting it unless told not to) a file whose first bytes are a pickle, a zip (torch's
    format) or anything but a safetensors header; fewer than 8 bytes pass."""
    with path.open("rb") as file:
        start = file.read(16)
    if len(start) < 8:
        return
    problem = None
    if is_pickle_start(start):
        problem = (
            "its first bytes are a pickle (a .ckpt / torch.save file): loading one runs whatever "
            "code it holds"
        )
    else:
        length = header_length(start)
        if not (length and 1 < length <= MAX_HEADER_BYTES and (total is None or length < total)):
            shown = start.decode("latin-1").encode("unicode_escape").decode()
            problem = f"it is not a safetensors file (it starts with {shown!r})"
            if start.lstrip().startswith(b"<"):
                problem += ": a web page, which a site sends for a missing or refused token"
    if problem:
        if delete:
            path.unlink(missing_ok=True)
        raise DownloadError(f"{path.name}: {problem}" + ("; nothing was kept" if delete else ""))


def fetch_url(
    url: str,
    destination: Path,
    token: str | None,
    previous: Mapping[str, object] | None = None,
    named: Callable[[str], None] | None = None,
) -> tuple[Path, str]:
    """Download `url` into `.<name>.partial` in `destination`, resuming what a previous run left
    there; (the complete partial file, the checkpoint's file name).

    The name is Content-Disposition's, else the one an earlier run of the same download recorded
    in `previous` (a server may name the file on its first answer only), else the URL's last
    segment; `named` hears it as soon as it is known."""
    partial = partial_path(destination, url)
    known = (previous or {}).get("checkpoint")
    fallback = known if isinstance(known, str) and partial.exists() else _url_name(url)
    shown = redact(url)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    name = None
    total: int | None = None
    timeout = httpx.Timeout(60.0, connect=15.0)
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        for attempt in range(MAX_ATTEMPTS):
            offset = partial.stat().st_size if partial.exists() else 0
            if offset:
                check_start(partial)
            before = offset
            try:
                with client.stream(
                    "GET", url, headers={**auth, **({"Range": f"bytes={offset}-"} if offset else {})}
                ) as response:
                    if response.status_code == 416 and offset:
                        whole = _range_total(response.headers.get("Content-Range", ""))
                        if whole == offset:  # the partial file is the whole file
                            return partial, name or _checkpoint_name(fallback)
                        partial.unlink()  # the file changed on the server: start again
                        continue
                    if response.status_code >= 500 and partial.exists():
                        raise DownloadError(
                            f"{shown} answered HTTP {response.status_code} when asked for the rest of the "
                            f"file: the download was interrupted after {offset:,} bytes, which "
                            f"{partial.name} keeps: run the same command again to resume it"
                        )
                    _refuse_status(response, shown, token)
                    name = _checkpoint_name(_filename(response) or fallback)
                    if named is not None:
                        named(name)
                    if response.status_code == 206:
                        start = _range_start(response.headers.get("Content-Range", ""))
                        total = _range_total(response.headers.get("Content-Range", ""))
                        if start != offset:
                            partial.unlink()
                            continue
                    else:  # 200: the server sends the whole file (it ignored the Range)
                        offset = 0
                        length = response.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                    with partial.open("r+b" if offset else "wb") as file:
                        file.seek(offset)
                        file.truncate()
                        checked = offset >= 8
                        for chunk in response.iter_bytes(_CHUNK):
                            file.write(chunk)
                            offset += len(chunk)
                            if not checked and offset >= 8:
                                file.flush()
                                check_start(partial, total)
                                checked = True
                    if offset < 8:
                        check_start(partial, total)
                if total is not None and offset != total:
                    raise httpx.RemoteProtocolError(f"the server sent {offset:,} of {total:,} bytes")
                return partial, name
            except httpx.TransportError as error:
                got = partial.stat().st_size if partial.exists() else 0
                if got > before and attempt + 1 < MAX_ATTEMPTS:
                    continue  # some bytes came: resume at once
                of = f" of {total:,}" if total else ""
                raise DownloadError(
                    f"the download of {shown} was interrupted after {got:,}{of} bytes "
                    f"({_first_line(error)}); {partial.name} keeps them: run the same command again "
                    "to resume it"
                ) from error
    raise DownloadError(
        f"the download of {shown} did not complete in {MAX_ATTEMPTS} attempts; run the command again"
    )


def _range_start(content_range: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/", content_range.strip())
    return int(match[1]) if match else None


def _range_total(content_range: str) -> int | None:
    match = re.search(r"/(\d+)$", content_range.strip())
    return int(match[1]) if match else None


def _refuse_status(response: httpx.Response, shown: str, token: str | None) -> None:
    status = response.status_code
    if status in (401, 403):
        if token:
            raise DownloadError(f"{shown} refused the token (HTTP {status}): check DOWNLOAD_TOKEN / --token")
        raise DownloadError(
            f"{shown} needs a token (HTTP {status}): set {DOWNLOAD_TOKEN_ENV} (a Civitai API key, "
            "say) or pass --token"
        )
    if status >= 400:
        raise DownloadError(f"{shown} answered HTTP {status}; nothing was downloaded")
    if status not in (200, 206):
        raise DownloadError(f"{shown} answered HTTP {status}, not the file")


# -- verification --


def verify(
    path: Path, expected_sha256: str | None, what: str, delete: bool = True, known_sha256: str | None = None
) -> str:
    """The file's sha256, once its header parses, its size is the header's end of data, and the
    sha256 is the one expected; otherwise the file is deleted (unless told not to) and
    DownloadError says why. `known_sha256`: the file's, already computed."""
    try:
        problem = None
        length, header = read_header(path)
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list):
                raise NotSafetensors(f"its header entry {name!r} is not a tensor")
            end = max(end, int(entry["data_offsets"][1]))
        size, expected = path.stat().st_size, 8 + length + end
        if size != expected:
            problem = (
                f"it is {size:,} bytes but its header describes {expected:,} "
                f"({'truncated' if size < expected else 'extra bytes'})"
            )
        digest = (known_sha256 or sha256_of(path)) if problem is None else None
        if digest is not None and expected_sha256 and digest != expected_sha256.lower():
            problem = (
                f"its sha256 is {digest}, not the {expected_sha256.lower()} expected (corrupted in transit?)"
            )
    except (NotSafetensors, ValueError, TypeError) as error:
        problem = f"it is not a whole safetensors file ({error})"
    if problem:
        if not delete:
            raise DownloadError(f"{what} is not a checkpoint to serve: {problem}")
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{what} failed verification: {problem}. The file was deleted; run the command again."
        )
    return digest


# -- the destination --


def _same_file(url: str, other: str) -> bool:
    """The same download: the same hub repo and file (any revision), or the same URL."""
    first, second = hub_parts(url), hub_parts(other)
    if first and second:
        return (first[0], first[2]) == (second[0], second[2])
    return redact(url) == redact(other)


def what_it_holds(source: Mapping[str, object]) -> str:
    if source.get("model_id"):
        return f"the pipeline {source['model_id']}"
    return (
        f"the checkpoint {source.get('checkpoint') or '?'} (from {source.get('source') or source.get('url')})"
    )


def refuse_another_model(
    destination: Path,
    reference: str,
    *,
    model_id: str | None = None,
    url: str | None = None,
    local: Path | None = None,
) -> None:
    """Refuse a destination that holds another model (or files of unknown origin): a download
    must not mix its files with another's."""
    if not destination.is_dir():
        return
    source, problem = read_source(destination)
    if problem:
        raise DownloadError(f"{problem[0]}: delete it (or empty {destination}), then run the command again")
    advice = f"Empty {destination} (keep its README.md), or download into another directory with --dest DIR."
    if source:
        if model_id is not None and source.get("model_id") == model_id:
            return
        if url is not None and isinstance(source.get("url"), str) and _same_file(url, source["url"]):
            return
        if local is not None and (
            source.get("source") == str(local)
            or (local.parent == destination.resolve() and source.get("checkpoint") == local.name)
        ):
            return
        raise DownloadError(
            f"{destination} holds {what_it_holds(source)}; {reference} would be mixed with it. {advice}"
        )
    others = sorted(
        entry.name
        for entry in destination.iterdir()
        if entry.name not in IGNORED_FILES
        and not (local is not None and local.parent == destination.resolve() and entry.name == local.name)
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise DownloadError(
            f"{destination} already holds files of another model or download ({shown}) and no {SOURCE_FILE} "
            f"that says they are {reference}. {advice}"
        )


def write_source(destination: Path, source: Mapping[str, object]) -> None:
    path = destination / SOURCE_FILE
    temporary = path.with_name(f".{SOURCE_FILE}.tmp")
    temporary.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def fetch_configs(repository: str, destination: Path, token: str | None) -> list[str]:
    """The configs and tokenizers (no weights) of `repository`'s pipeline components into
    `destination`: model_index.json, <component>/*.json and *.txt (safety checker and feature
    extractor left out). Returns the components."""
    from huggingface_hub import hf_hub_download, snapshot_download

    endpoint = hf_endpoint()
    what = f"the configs of {repository}"
    try:
        index = hf_hub_download(
            repository, "model_index.json", local_dir=destination, token=token, endpoint=endpoint
        )
        components = [
            c
            for c in component_names(json.loads(Path(index).read_text(encoding="utf-8")))
            if c not in NOT_CONFIGS
        ]
        patterns = ["model_index.json"] + [
            f"{c}/*{suffix}" for c in components for suffix in (".json", ".txt")
        ]
        snapshot_download(
            repository,
            local_dir=destination,
            allow_patterns=patterns,
            ignore_patterns=["*.index.json"],
            token=token,
            endpoint=endpoint,
        )
    except hub_errors() as error:
        raise _hub_error(error, what) from error
    return components


def set_prediction_type(destination: Path, prediction_type: str) -> None:
    path = destination / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("prediction_type") != prediction_type:
        config["prediction_type"] = prediction_type
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# -- the whole download --


def download_checkpoint(
    reference: HubCheckpoint | UrlCheckpoint | LocalCheckpoint,
    asked: str,
    destination: Path | None,
    options: Options,
    commit: str | None = None,
) -> Path:
    """Fetch, verify and describe a single-file checkpoint, with its family's configs beside it;
    the checkpoint's path. `destination` None: weights/, or for a local file its own directory
    (another directory gets a copy of it)."""
    from sdcog.model.checkpoints import inspect_checkpoint

    url: str | None = None
    name: str | None = None
    if options.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", options.sha256):
        raise DownloadError(f"--sha256 {options.sha256!r} is not a sha256 (64 hexadecimal digits)")
    expected = options.sha256.lower() if options.sha256 else None
    in_place = False
    if isinstance(reference, LocalCheckpoint):
        in_place = destination is None or destination.resolve() == reference.path.parent
        destination = reference.path.parent if in_place else destination
        name = reference.path.name
        refuse_another_model(destination, asked, local=reference.path)
    else:
        destination = destination or DEFAULT_WEIGHTS_DIR
        if isinstance(reference, HubCheckpoint):
            if commit is None:
                reference, commit = resolve_hub_file(reference, options.hf_token)
            from huggingface_hub import hf_hub_url

            url = hf_hub_url(reference.repo, reference.path, revision=commit, endpoint=hf_endpoint())
            name = reference.name
            if expected and reference.sha256 and expected != reference.sha256:
                raise DownloadError(
                    f"--sha256 {options.sha256} is not the sha256 the hub gives for {reference.repo}/"
                    f"{reference.path} ({reference.sha256}); nothing was downloaded"
                )
            expected = expected or reference.sha256
        else:
            url = reference.url
        refuse_another_model(destination, asked, url=url)
    destination.mkdir(parents=True, exist_ok=True)
    previous = read_source(destination)[0]
    source: dict[str, object] = {
        "checkpoint": name or previous.get("checkpoint"),
        "source": str(reference.path) if isinstance(reference, LocalCheckpoint) else redact(asked),
        "url": redact(url) if url else None,
        "sha256": expected,
        "size": getattr(reference, "size", None),
        "config_repository": None,
        "complete": False,
        **options.declarations(),
    }
    if in_place and previous.get("checkpoint") == name:  # keep where an earlier download got it
        source.update(source=previous.get("source", source["source"]), url=previous.get("url"))
    write_source(destination, source)

    def named(checkpoint_name: str) -> None:
        source["checkpoint"] = checkpoint_name
        write_source(destination, source)

    path = _already_there(destination, previous, expected)
    digest = None
    if path is not None:
        digest = str(previous["sha256"])
        print(f"{path.name} is already in {destination}, whole (its sha256 checked).")
    elif in_place:
        path = reference.path
    elif isinstance(reference, HubCheckpoint):
        path = _hub_download(reference, commit, destination, options.hf_token)
    else:
        if isinstance(reference, UrlCheckpoint):
            partial, name = fetch_url(reference.url, destination, options.url_token, previous, named)
        else:  # a local file copied into the destination
            partial = destination / f".{name}.partial"
            shutil.copyfile(reference.path, partial)
        named(name)
        check_start(partial)
        verify(partial, expected, redact(asked))
        path = destination / name
        os.replace(partial, path)
    check_start(path, delete=not in_place)
    what = str(path) if in_place else f"{path.name} (from {redact(asked)})"
    digest = verify(path, expected, what, delete=not in_place, known_sha256=digest)
    source.update(checkpoint=path.name, sha256=digest, size=path.stat().st_size)
    write_source(destination, source)

    # What the file is depends on the file and the declarations only, not on configs a previous
    # run fetched (the scheduler config is fetched again below).
    (destination / "scheduler" / "scheduler_config.json").unlink(missing_ok=True)
    try:
        info = inspect_checkpoint(path, environ=options.environ())
    except WeightsError as error:
        if in_place:
            raise
        path.unlink(missing_ok=True)
        raise DownloadError(f"{error} The downloaded file was deleted.") from error
    fetch_configs(info.config_repository, destination, options.hf_token)
    set_prediction_type(destination, info.prediction_type)
    source.update(config_repository=info.config_repository, complete=True)
    write_source(destination, source)
    _clean_hub_leftovers(destination)
    print(describe(info, path, destination))
    return path


def _already_there(destination: Path, previous: Mapping[str, object], expected: str | None) -> Path | None:
    """The checkpoint an earlier run of the same download (the caller checked it is the same)
    verified and recorded, when it is still the file recorded (its size and sha256)."""
    name, recorded = previous.get("checkpoint"), previous.get("sha256")
    if not (isinstance(name, str) and isinstance(recorded, str)) or (expected and recorded != expected):
        return None
    path = destination / name
    if path.is_file() and path.stat().st_size == previous.get("size") and sha256_of(path) == recorded:
        return path
    return None


def _clean_hub_leftovers(destination: Path) -> None:
    """huggingface_hub's partial files a killed earlier run left (never resumed by it)."""
    download_dir = destination / ".cache" / "huggingface" / "download"
    if download_dir.is_dir():
        for leftover in download_dir.rglob("*.incomplete"):
            leftover.unlink(missing_ok=True)


def describe(info, path: Path, destination: Path) -> str:
    few_step = getattr(info.few_step, "kind", None) or "none"
    detected = (
        info.describe()
        if hasattr(info, "describe")
        else (
            f"{info.family.label}; inpainting: {'yes' if info.inpainting else 'no'}; "
            f"prediction: {info.prediction_type}; few-step: {few_step}"
        )
    )
    return (
        f"{path.name} is in {destination}: {detected}. Its configs and tokenizers (from "
        f"{info.config_repository}) are beside it; setup() loads it from there."
    )
