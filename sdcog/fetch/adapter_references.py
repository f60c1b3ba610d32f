"""Where a LoRA or an embedding named in a request comes from: one reference syntax, one resolver.

A reference is one of:
- an https URL to a `.safetensors` file, or a `data:` URI of one;
- `huggingface.co/<owner>/<repo>` (also `hf:<owner>/<repo>`), optionally followed by
  `/<file>.safetensors` and `@<revision>`: a file of a Hugging Face repository (without a file, the
  repository's one `.safetensors` file, or among several the usual one for its kind: diffusers'
  `pytorch_lora_weights.safetensors` or `learned_embeds.safetensors`); a
  file's page or download URL (`.../blob/<revision>/<file>`, `.../resolve/...`) reads the same;
- `<owner>/<model>` or `<owner>/<model>/<version>` (also after `replicate.com/`): the weights of a
  Replicate model, as in Replicate's own LoRA models (a tar holding the `.safetensors` file).

A bare `<owner>/<name>` means Replicate, as on Replicate's own models; Hugging Face repos take the
`huggingface.co/` prefix. Only https is fetched (and only public hosts, unless the operator allows
local ones: `sdcog.fetch.input_files`). Nothing here touches the network except `resolve_download`'s
listing of a Hugging Face repository.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from sdcog.errors import InputError

HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
REPLICATE_ENDPOINT_ENV = "SDCOG_REPLICATE_ENDPOINT"
DEFAULT_REPLICATE_ENDPOINT = "https://replicate.com"


@dataclass(frozen=True)
class AdapterKind:
    """What a reference is fetched for: its input field, and which file to take where there are several."""

    field: str
    hf_file: str
    """The file diffusers' trainers write, taken from a Hugging Face repository holding several."""
    tar_member: str
    """The member Replicate's trainers write, taken from a Replicate model's weights tar."""


LORA = AdapterKind("lora_weights", "pytorch_lora_weights.safetensors", "lora.safetensors")
EMBEDDING = AdapterKind("embeddings", "learned_embeds.safetensors", "embeddings.pti")
DIFFUSERS_MODEL_FILE = "diffusion_pytorch_model.safetensors"
"""A diffusers model's weights file (a ControlNet repository's), generic as the two above."""
_GENERIC_FILES = {LORA.hf_file, EMBEDDING.hf_file, DIFFUSERS_MODEL_FILE}

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF = re.compile(
    rf"^(?:hf:|(?:https://)?(?:www\.)?(?:huggingface\.co|hf\.co)/)(?P<repo>{_NAME}/{_NAME})"
    r"(?:/(?P<file>[^@]+?\.safetensors))?(?:@(?P<revision>[\w./-]+))?/?$"
)
_HF_FILE_URL = re.compile(
    rf"^https://(?:huggingface\.co|hf\.co)/(?P<repo>{_NAME}/{_NAME})/(?:blob|resolve)/(?P<revision>[^/]+)/"
    r"(?P<file>[^?#]+\.safetensors)(?:[?#].*)?$"
)
_REPLICATE = re.compile(
    rf"^(?:(?:https://)?replicate\.com/)?(?P<owner>{_NAME})/(?P<model>{_NAME})"
    r"(?:/(?:versions/)?(?P<version>[0-9a-f]{8,64}))?/?$"
)


@dataclass(frozen=True)
class AdapterReference:
    """A parsed reference: what the user wrote, where it points, and a short name for metadata."""

    text: str
    kind: str
    """"url", "data", "huggingface" or "replicate"."""
    location: str
    """The URL (url, data), the repo id (huggingface) or owner/model[/version] (replicate)."""
    file: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """A short name (a file stem or a model name), for logs and the infotext's `Lora hashes`."""
        if self.kind == "data":
            return "inline"
        if self.kind == "url":
            stem = PurePosixPath(unquote(urlsplit(self.location).path)).stem
            return _metadata_safe(stem or urlsplit(self.location).hostname or "lora")
        if self.file and self.file not in _GENERIC_FILES:
            return _metadata_safe(PurePosixPath(self.file).stem)
        return _metadata_safe(self.location.split("/")[1])


def _metadata_safe(name: str) -> str:
    """No characters that would break the infotext's `name: hash, ...` lists."""
    return re.sub(r"[,:\"\n]+", "_", name)[:80]


def parse_reference(field: str, text: str) -> AdapterReference:
    """One reference of `field`, checked for its syntax only (no network)."""
    reference = text.strip()
    if reference.lower().startswith("data:"):
        return AdapterReference(reference, "data", reference)
    if hf := _HF_FILE_URL.match(reference):  # a file's page or download URL, copied from the browser
        return AdapterReference(text, "huggingface", hf["repo"], unquote(hf["file"]), hf["revision"])
    if hf := _HF.match(reference):
        return AdapterReference(text, "huggingface", hf["repo"], hf["file"], hf["revision"])
    if reference.lower().startswith(("https://", "http://")):
        if not urlsplit(reference).hostname:
            raise InputError(field, f"{_shown(reference)} is not a valid URL")
        if urlsplit(reference).hostname in ("replicate.com", "www.replicate.com"):
            if replicate := _REPLICATE.match(reference):
                return _replicate(text, replicate)
        return AdapterReference(text, "url", reference)
    if replicate := _REPLICATE.match(reference):
        return _replicate(text, replicate)
    raise InputError(
        field,
        f"{_shown(reference)} is not a reference this model reads: use an https URL to a .safetensors "
        "file, huggingface.co/<owner>/<repo>[/<file>.safetensors], or a Replicate model <owner>/<model>",
    )


def _replicate(text: str, match: re.Match) -> AdapterReference:
    location = f"{match['owner']}/{match['model']}"
    if match["version"]:
        location += f"/{match['version']}"
    return AdapterReference(text, "replicate", location)


def _shown(reference: str) -> str:
    return repr(reference if len(reference) <= 80 else reference[:77] + "...")


def hf_endpoint(environ=os.environ) -> str:
    """Where Hugging Face repos are read: HF_ENDPOINT (huggingface_hub's own setting), for a mirror."""
    return (environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")


def replicate_endpoint(environ=os.environ) -> str:
    """Where Replicate models' weights are read: SDCOG_REPLICATE_ENDPOINT, for a mirror."""
    return (environ.get(REPLICATE_ENDPOINT_ENV) or DEFAULT_REPLICATE_ENDPOINT).rstrip("/")


def resolve_download(kind: AdapterKind, reference: AdapterReference, token: str | None = None) -> str:
    """The URL to download for a huggingface, replicate or url reference.

    For a Hugging Face repository without a file name, the repository is listed (the one network
    call here) to find its `.safetensors` file.
    """
    if reference.kind in ("url", "data"):
        return reference.location
    if reference.kind == "replicate":
        owner, model, *version = reference.location.split("/")
        path = f"{owner}/{model}" + (f"/versions/{version[0]}" if version else "")
        return f"{replicate_endpoint()}/{path}/_weights"
    revision = reference.revision or "main"
    file = reference.file or _single_safetensors_file(kind, reference, revision, token)
    return hub_file_url(reference.location, file, revision)


def hub_file_url(repository: str, file: str, revision: str | None = None) -> str:
    """The download URL of a file of a Hugging Face repository, at HF_ENDPOINT."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repository, file, revision=revision or "main", endpoint=hf_endpoint())


HUB_TIMEOUT_S = 20.0
"""How long listing a Hugging Face repository may take (one request, no retries)."""


def _single_safetensors_file(
    kind: AdapterKind, reference: AdapterReference, revision: str, token: str | None
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    field = kind.field
    try:
        # The repository's info lists its files in one request; list_repo_files would page through
        # huggingface_hub's backoff, which retried an unreachable hub for 23 s before refusing.
        info = HfApi(endpoint=hf_endpoint()).model_info(
            reference.location, revision=revision, token=token or False, timeout=HUB_TIMEOUT_S
        )
        files = [sibling.rfilename for sibling in info.siblings or []]
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", "?")
        raise InputError(
            field,
            f"cannot list the Hugging Face repository {reference.location} (HTTP {status}): check the "
            "name, and for a private or gated repository send hf_api_token (or set the server's HF_TOKEN)",
        ) from error
    except Exception as error:  # huggingface_hub's HTTP client (httpx2) raises its own transport errors
        raise InputError(
            field, f"cannot reach Hugging Face to list {reference.location}: {type(error).__name__}: {error}"
        ) from error
    candidates = [name for name in files if name.endswith(".safetensors")]
    if kind.hf_file in candidates:
        return kind.hf_file
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(field, f"the Hugging Face repository {reference.location} has no .safetensors file")
    raise InputError(
        field,
        f"the Hugging Face repository {reference.location} holds {len(candidates)} .safetensors files "
        f"({', '.join(candidates[:5])}{', ...' if len(candidates) > 5 else ''}): name one, as in "
        f"huggingface.co/{reference.location}/{candidates[0]}",
    )
