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

Here: the verification, the destination (its sdcog-source.json) and `download_checkpoint`, which
runs the whole; checkpoint_references.py reads a reference, hub_checkpoint.py talks to the hub,
url_download.py fetches a plain URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from sdcog.fetch.adapter_references import hf_endpoint
from sdcog.model.safetensors_files import NotSafetensors, described_size, read_header, sha256_of
from sdcog.model.weights import DEFAULT_WEIGHTS_DIR, SOURCE_FILE, WeightsError, read_source
from sdcog_tools.checkpoint_references import (
    DownloadError,
    HubCheckpoint,
    LocalCheckpoint,
    Options,
    UrlCheckpoint,
    hub_parts,
    redact,
)
from sdcog_tools.hub_checkpoint import fetch_configs, hub_download, resolve_hub_file
from sdcog_tools.url_download import check_start, fetch_url

IGNORED_FILES = ("README.md", ".gitkeep", ".gitignore", ".DS_Store")


# -- verification --


def verify(
    path: Path, expected_sha256: str | None, what: str, delete: bool = True, known_sha256: str | None = None
) -> str:
    """The file's sha256, once its header parses, its size is the header's end of data, and the
    sha256 is the one expected; otherwise the file is deleted (unless told not to) and
    DownloadError says why. `known_sha256`: the file's, already computed."""
    try:
        problem = None
        size, expected = path.stat().st_size, described_size(*read_header(path))
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
        path = hub_download(reference, commit, destination, options.hf_token)
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
