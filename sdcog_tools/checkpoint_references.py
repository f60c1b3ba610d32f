"""What a `script/download-weights` reference names, before any network call: a hub repo
(PipelineRepo), one file of one (HubCheckpoint), a plain URL (UrlCheckpoint) or a file on disk
(LocalCheckpoint), as parse_reference reads it; the refusal of pickle names; the Options a download
runs with; and DownloadError, which every step of it raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sdcog.fetch.adapter_references import hf_endpoint
from sdcog.model.checkpoints import FEW_STEP_SETTING, PREDICTION_SETTING, is_pickle_name

CHECKPOINT_SUFFIX = ".safetensors"
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
SECRET_PARAMETERS = ("token", "access_token", "api_key", "apikey", "key")
"""Query parameters dropped from a URL before it is printed or written to sdcog-source.json."""
_HUB_PATH = re.compile(r"^/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)$")


class DownloadError(RuntimeError):
    """A download refused or failed; the message says what is (not) kept and what to run."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        if is_pickle_name(name):
            raise pickle_refusal(name)
        return UrlCheckpoint(text)
    local = Path(text).expanduser()
    if local.is_file():
        if is_pickle_name(local.name):
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
    if is_pickle_name(path):
        raise pickle_refusal(f"{repo}/{path}")
    if not path.endswith(CHECKPOINT_SUFFIX):
        raise DownloadError(f"{repo}/{path} is not a .safetensors checkpoint")
    return HubCheckpoint(repo, path, revision)
