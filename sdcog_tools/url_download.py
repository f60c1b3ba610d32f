"""The resumable download of a plain URL (Civitai...) with httpx: into `.<name>.partial`, resumed
by a rerun with a Range request (and at once when a connection is lost after some bytes), the
server's refusals worded, the file named from Content-Disposition or the URL, and check_start,
which refuses a file whose first bytes are not a safetensors header.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from email.message import Message
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from sdcog.model.checkpoints import is_pickle_start
from sdcog.model.safetensors_files import MAX_HEADER_BYTES, header_length
from sdcog_tools.checkpoint_references import (
    CHECKPOINT_SUFFIX,
    DownloadError,
    first_line,
    is_pickle_name,
    pickle_refusal,
    redact,
)

DOWNLOAD_TOKEN_ENV = "DOWNLOAD_TOKEN"
MAX_ATTEMPTS = 3
"""GETs of a plain URL in one run: a connection lost after some bytes is resumed at once."""
_CHUNK = 1 << 20


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
    if is_pickle_name(name):
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
                    f"({first_line(error)}); {partial.name} keeps them: run the same command again "
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
