"""The Hugging Face hub side of a single-file checkpoint, through huggingface_hub: a repo told
apart (pipeline or checkpoint repo), a file's LFS sha256 and size, the file fetched into the
destination, the configs and tokenizers of its family's repository, and hub errors worded for the
person who ran `script/download-weights`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from sdcog.fetch.adapter_references import hf_endpoint
from sdcog.model.checkpoints import VAE_SUFFIX
from sdcog.model.weights import component_names
from sdcog_tools.checkpoint_references import (
    CHECKPOINT_SUFFIX,
    DownloadError,
    HubCheckpoint,
    PipelineRepo,
    Reference,
    first_line,
    is_pickle_name,
)

NOT_CONFIGS = ("safety_checker", "feature_extractor")
"""Folders of a config repository left out: the checkpoint has no safety checker."""


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
    return DownloadError(f"the download of {what} was interrupted ({first_line(error)}); {then}")


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
        pickles = [name for name in siblings if is_pickle_name(name)]
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


def hub_download(checkpoint: HubCheckpoint, commit: str, destination: Path, token: str | None) -> Path:
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
