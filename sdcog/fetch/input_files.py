"""Files users send (images, masks): fetched under limits, never read from the server's disk.

A file input arrives in `predict()` as one of:
- an https URL or a data URI, which Cog would download itself before `predict()` runs, with no
  size limit and no overall timeout. `guard_cog_downloads()` (called in `setup()`) makes Cog hand
  over the reference instead, and `read_input_file` fetches it here: https only, a size limit, a
  connect and an overall timeout, redirects checked hop by hop, and no hosts on loopback, private
  or link-local networks (which would let a request reach the server's own network);
- a path Cog has already downloaded to (if the guard could not be installed on this Cog
  version), or a path an in-process Python caller passes: read with the same size limit;
- a plain string that is neither: Cog passes it through as is. It is refused, since reading it
  would open a file on the server (another prediction's output, the model's weights...).

Operator settings (environment variables of the server):
- `SDCOG_MAX_INPUT_MB` (default 32): the largest file accepted, in MB;
- `SDCOG_ALLOW_LOCAL_URLS=1`: also accept http:// and hosts on private and loopback networks, for
  a server that fetches from its own network (and for the tests, which serve files on 127.0.0.1).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import os
import pathlib
import socket
import time
import urllib.parse
from collections.abc import Mapping
from typing import BinaryIO

import httpx

from sdcog.errors import InputError
from sdcog.pinned_internals import relies_on_internals

log = logging.getLogger(__name__)

MAX_INPUT_MB_ENV = "SDCOG_MAX_INPUT_MB"
ALLOW_LOCAL_URLS_ENV = "SDCOG_ALLOW_LOCAL_URLS"
DEFAULT_MAX_INPUT_MB = 32
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 120.0
MAX_REDIRECTS = 5
_CHUNK = 1 << 16


def max_input_bytes(environ: Mapping[str, str] = os.environ) -> int:
    return int(float(environ.get(MAX_INPUT_MB_ENV) or DEFAULT_MAX_INPUT_MB) * 1_000_000)


def local_urls_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(ALLOW_LOCAL_URLS_ENV, "").strip().lower() in {"1", "true", "yes"}


def _too_large(field: str, size: int, limit: int, setting: str = MAX_INPUT_MB_ENV) -> InputError:
    """The refusal of a file over `limit`, naming the operator's `setting` that sets it."""
    return InputError(field, f"is {size / 1e6:.1f} MB or more; the limit is {limit / 1e6:g} MB ({setting})")


def _check_host(field: str, url: httpx.URL, allow_local: bool) -> None:
    """Refuse a URL whose scheme or host the server must not fetch."""
    if url.scheme not in ("https", "http") or (url.scheme == "http" and not allow_local):
        allowed = "https:// or http://" if allow_local else "https://"
        raise InputError(field, f"must be a data URI or an {allowed} URL, got a {url.scheme}:// URL")
    if allow_local:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(url.host, url.port or 443)}
    except (socket.gaierror, UnicodeError) as error:
        raise InputError(field, f"cannot resolve the host of {url}: {error}") from error
    for address in addresses:
        if not ipaddress.ip_address(address.split("%", 1)[0]).is_global:
            raise InputError(
                field,
                f"the host of {url} is on a private, loopback or link-local network ({address}), "
                f"which this server does not fetch from ({ALLOW_LOCAL_URLS_ENV}=1 allows it)",
            )


def fetch_url(field: str, url: str, limit: int | None = None, allow_local: bool | None = None) -> bytes:
    """The body of an https URL, under the size limit and timeouts; InputError naming `field` if not."""
    body = io.BytesIO()
    fetch_url_to(body, field, url, limit, allow_local)
    return body.getvalue()


def fetch_url_to(
    sink: BinaryIO,
    field: str,
    url: str,
    limit: int | None = None,
    allow_local: bool | None = None,
    headers: Mapping[str, str] | None = None,
    setting: str = MAX_INPUT_MB_ENV,
) -> int:
    """Stream an https URL's body into `sink` under the size limit and timeouts; the size written.

    `headers` (a token) are sent to the URL's own host only, never to a host it redirects to.
    `setting`: the operator's setting that `limit` comes from, named when a body is over it.
    """
    limit = max_input_bytes() if limit is None else limit
    allow_local = local_urls_allowed() if allow_local is None else allow_local
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise InputError(field, f"is not a valid URL ({error})") from error
    shown = _without_query(target)
    origin = target.host
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            _check_host(field, target, allow_local)
            try:
                sent = dict(headers or {}) if target.host == origin else {}
                with client.stream("GET", target, headers=sent) as response:
                    if response.is_redirect:
                        target = target.join(response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InputError(field, f"fetching {shown} answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > limit:
                        raise _too_large(field, declared, limit, setting)
                    size = 0
                    for chunk in response.iter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise _too_large(field, size, limit, setting)
                        if time.monotonic() > deadline:
                            raise InputError(field, f"fetching {shown} took over {TOTAL_TIMEOUT_S:g} s")
                        sink.write(chunk)
                    return size
            except httpx.TimeoutException as error:
                raise InputError(field, f"fetching {shown} timed out ({type(error).__name__})") from error
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                raise InputError(field, f"cannot fetch {shown}: {error}") from error
    raise InputError(field, f"fetching {shown} was redirected more than {MAX_REDIRECTS} times")


def _without_query(url: httpx.URL) -> str:
    """The URL for messages and logs: its query (which may hold a signature or a token) left out."""
    return str(url.copy_with(query=None, fragment=None))


def decode_data_uri(field: str, uri: str, limit: int | None = None, setting: str = MAX_INPUT_MB_ENV) -> bytes:
    """The bytes of a `data:[<type>][;base64],<data>` URI, under the size limit (`setting` names it)."""
    limit = max_input_bytes() if limit is None else limit
    header, separator, payload = uri.partition(",")
    if not separator:
        raise InputError(field, "is a data URI without a comma before its data")
    if len(payload) * 3 // 4 > limit:
        raise _too_large(field, len(payload) * 3 // 4, limit, setting)
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as error:
            raise InputError(field, f"is a data URI whose base64 data is broken: {error}") from error
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limit:  # percent-encoded data is not 3/4 of its text: the estimate above is no bound
        raise _too_large(field, len(data), limit, setting)
    return data


def read_input_file(field: str, value: object) -> bytes:
    """The content of a file input, however it arrived (see the module docstring)."""
    source = getattr(value, "source", None)  # a reference Cog handed over undownloaded
    if isinstance(source, str):
        return read_reference(field, source)
    if isinstance(value, pathlib.Path):
        limit = max_input_bytes()
        try:
            size = value.stat().st_size
            if size > limit:
                raise _too_large(field, size, limit)
            return value.read_bytes()
        except OSError as error:
            raise InputError(field, f"cannot read the uploaded file: {error.strerror}") from error
    if isinstance(value, str):
        return read_reference(field, value)
    raise InputError(field, f"must be a file (a URL or a data URI), got {type(value).__name__}")


def read_reference(field: str, reference: str) -> bytes:
    """A data URI or an http(s) URL; anything else (a path on the server) is refused."""
    scheme = reference.partition(":")[0].lower() if ":" in reference else ""
    if scheme == "data":
        return decode_data_uri(field, reference)
    if scheme in ("http", "https"):
        return fetch_url(field, reference)
    shown = reference if len(reference) <= 60 else reference[:57] + "..."
    raise InputError(field, f"must be an https URL or a data URI, got {shown!r}")


@relies_on_internals("cog", "0.23.1", "cog.types.URLPath.convert and cog.types.Path.validate, replaced")
def guard_cog_downloads() -> bool:
    """Make Cog hand URL and data-URI file inputs to `predict()` untouched; True if installed.

    Cog (0.23) turns such a string into a `cog.types.URLPath` while validating inputs: it parses
    the URL and decodes a whole data URI in memory there (an error then reaches the user without
    the field's name), and downloads URLs before `predict()` with no size limit. The replacements
    wrap the string as it came, and `convert()` returns it undownloaded; `read_input_file` then
    fetches or decodes `.source` under this module's limits, naming the input.
    """
    try:
        from cog.types import Path as CogPath
        from cog.types import URLPath
    except ImportError:
        return False
    hooks = [(URLPath, "convert"), (CogPath, "validate")]
    if not all(callable(getattr(cls, name, None)) for cls, name in hooks):
        log.warning("this Cog version differs from 0.23: Cog reads and downloads file inputs itself")
        return False
    validate = CogPath.validate

    def wrap_reference(cls: type, value: object) -> pathlib.Path:
        if isinstance(value, str) and value.partition(":")[0].lower() in ("data", "http", "https"):
            return URLPath(source=value, filename="input", fileobj=io.BytesIO())
        return validate(value)

    def hand_over(self: URLPath) -> URLPath:
        return self

    CogPath.validate = classmethod(wrap_reference)
    URLPath.convert = hand_over
    return True
