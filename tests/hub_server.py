"""A Hugging Face hub on 127.0.0.1 for tests: the HTTP API huggingface_hub 2.4's client uses (point
HF_ENDPOINT at `HubServer.url`), plain download URLs (`/files/<name>`, Civitai style), and faults.

What the client asks, and what is answered here as the hub does:

- `HfApi.model_info` / `repo_info`: `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true` adds each
  file's size, git blob id and LFS sha256/size), JSON with id, sha and siblings;
- `snapshot_download`: that call, then `GET /api/models/{repo}/tree/{commit}?recursive=true` (the file
  listing it filters with allow_patterns), then `hf_hub_download` per file;
- `HfApi.get_paths_info`: `POST /api/models/{repo}/paths-info/{rev}` (form field `paths`);
- `hf_hub_download`: `HEAD /{repo}/resolve/{rev}/{path}` for the metadata (X-Repo-Commit; ETag, the
  git blob id, or for an LFS file the sha256 in X-Linked-Etag with X-Linked-Size), then `GET` of the
  same URL, or of the `Location` a HEAD answered (a repo made with `cdn=True` redirects LFS files to
  `http://localhost:{port}/cdn-lfs/<sha256>`, another host, as the hub sends big files to its CDN:
  the client then drops the Authorization header). Range requests get 206 + Content-Range.
- errors as the hub words them: a private repo without its bearer token, or a missing repo, is 401
  with `X-Error-Code: RepoNotFound`; a missing revision 404 RevisionNotFound; a missing file 404
  EntryNotFound (with X-Repo-Commit, as the client caches the absence).

No Xet headers are ever sent (X-Xet-*, a `Link: ...; rel="xet-auth"`), so the client downloads over
plain HTTP even with hf_xet installed.

Faults, per file (a hub file or a plain one), consumed one per GET of its bytes: `Cut(n)` sends the
file's bytes up to offset n then closes the connection (an interrupted download; a GET starting at
or after n is cut at once), `Status(code)` answers that status instead, `Corrupt()` serves the bytes
with some changed (same length: only a hash notices). `Served.ranges = False` makes a file's server
ignore Range headers (200 and the whole file). `HubServer.requests` records every request (method,
path, headers); `count`, `requests_to` and `file_gets` filter them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".pkl")
LFS_POINTER_SIZE = 134


@dataclass(frozen=True)
class Cut:
    """Close the connection once the file's bytes up to this offset are sent."""

    at: int


@dataclass(frozen=True)
class Status:
    """Answer this HTTP status (no body) instead of the file."""

    code: int


@dataclass(frozen=True)
class Corrupt:
    """Serve the file with bytes changed in its second half (same length)."""


Fault = Cut | Status | Corrupt


@dataclass
class Served:
    """One file's bytes, and the faults its next GETs meet."""

    data: bytes
    faults: list[Fault] = field(default_factory=list)
    ranges: bool = True
    """False: Range headers are ignored (200 and the whole file), as some servers do."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """git's blob id: sha1 of "blob <size>\\0" + content."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, Served]
    token: str | None = None
    cdn: bool = False
    sha: str = ""

    def is_lfs(self, path: str) -> bool:
        return path.lower().endswith(LFS_SUFFIXES) or len(self.files[path].data) >= 10 * 2**20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """The path without the query string."""
    headers: Mapping[str, str]

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers.items() if key.lower() == name.lower()), None)


@dataclass
class PlainFile:
    served: Served
    token: str | None = None
    filename: str | None = None
    """Sent as Content-Disposition's filename (Civitai names its files so)."""


class HubServer:
    """A threaded HTTP server on 127.0.0.1 (a random port) answering as the hub and as plain hosts."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.plain: dict[str, PlainFile] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    # -- content --

    def add_repo(
        self, repo_id: str, files: Mapping[str, bytes], token: str | None = None, cdn: bool = False
    ) -> Repo:
        """A model repo at a single commit (its sha is derived from the content); `token`: private."""
        served = {path: Served(bytes(data)) for path, data in files.items()}
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(served):
            digest.update(path.encode() + b"\0" + served[path].blob_id.encode())
        repo = Repo(repo_id, served, token=token, cdn=cdn, sha=digest.hexdigest())
        self.repos[repo_id] = repo
        return repo

    def add_repo_from_dir(
        self,
        repo_id: str,
        directory: Path,
        extra: Mapping[str, bytes] | None = None,
        token: str | None = None,
        cdn: bool = False,
    ) -> Repo:
        files = {
            path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
        }
        return self.add_repo(repo_id, {**files, **(extra or {})}, token=token, cdn=cdn)

    def add_file(self, name: str, data: bytes, token: str | None = None, filename: str | None = None) -> str:
        """A plain file at `/files/<name>` (Range supported); its URL."""
        self.plain[name] = PlainFile(Served(bytes(data)), token=token, filename=filename)
        return f"{self.url}/files/{quote(name)}"

    def served(self, target: str) -> Served:
        """A file by `repo_id/path` (a hub file) or by its plain name."""
        if target in self.plain:
            return self.plain[target].served
        for repo_id, repo in self.repos.items():
            if target.startswith(repo_id + "/") and target[len(repo_id) + 1 :] in repo.files:
                return repo.files[target[len(repo_id) + 1 :]]
        raise KeyError(target)

    def fault(self, target: str, *faults: Fault) -> None:
        """Queue faults for the next GETs of a file's bytes (`repo_id/path`, or a plain file's name)."""
        self.served(target).faults.extend(faults)

    def clear_faults(self) -> None:
        for served in self._all_served():
            served.faults.clear()

    def _all_served(self) -> Iterable[Served]:
        for repo in self.repos.values():
            yield from repo.files.values()
        for plain in self.plain.values():
            yield plain.served

    # -- what was asked --

    def requests_to(self, path_end: str, method: str | None = None) -> list[Request]:
        """The requests whose path ends with `path_end` (URL-quoted as sent), of `method` if given."""
        with self._lock:
            return [
                request
                for request in self.requests
                if request.path.endswith(path_end) and method in (None, request.method)
            ]

    def count(self, path_end: str, method: str | None = None) -> int:
        return len(self.requests_to(path_end, method))

    def file_gets(self, target: str) -> list[Request]:
        """The GETs of a file's bytes: `repo_id/path` (at /resolve/ or at the CDN) or a plain name."""
        if target in self.plain:
            return self.requests_to(f"/files/{quote(target)}", "GET")
        served = self.served(target)
        repo_id = next(repo_id for repo_id in self.repos if target.startswith(repo_id + "/"))
        path = target[len(repo_id) + 1 :]
        with self._lock:
            return [
                request
                for request in self.requests
                if request.method == "GET"
                and (
                    (
                        request.path.startswith(f"/{repo_id}/resolve/")
                        and request.path.endswith("/" + quote(path))
                    )
                    or request.path == f"/cdn-lfs/{served.sha256}"
                )
            ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tree_entry(repo: Repo, path: str) -> dict:
    served = repo.files[path]
    entry = {"type": "file", "oid": served.blob_id, "size": len(served.data), "path": path}
    if repo.is_lfs(path):
        entry["lfs"] = {"oid": served.sha256, "size": len(served.data), "pointerSize": LFS_POINTER_SIZE}
    return entry


def _folders(paths: Iterable[str]) -> set[str]:
    return {"/".join(path.split("/")[:depth]) for path in paths for depth in range(1, path.count("/") + 1)}


def _corrupted(data: bytes) -> bytes:
    changed = bytearray(data)
    for offset in range(len(data) // 2, len(data), max(1, len(data) // 64)):
        changed[offset] ^= 0x5A
    return bytes(changed)


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        # -- dispatch --

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_POST(self) -> None:
            self._dispatch(head=False)

        def _dispatch(self, head: bool) -> None:
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            with server._lock:
                server.requests.append(Request(self.command, path, dict(self.headers.items())))
            body = b""
            if self.command == "POST":
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if match := _API.match(path):
                return self._api(match, query, body)
            if match := _RESOLVE.match(path):
                return self._resolve(unquote(match[1]), unquote(match[2]), unquote(match[3]), head)
            if path.startswith("/cdn-lfs/"):
                return self._cdn(path.removeprefix("/cdn-lfs/"), head)
            if path.startswith("/files/"):
                return self._plain(unquote(path.removeprefix("/files/")), head)
            self._error(404, "Not found")

        # -- answers --

        def _send(
            self, status: int, headers: Mapping[str, str], body: bytes = b"", head: bool = False
        ) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, value: object, headers: Mapping[str, str] | None = None) -> None:
            body = json.dumps(value).encode()
            self._send(200, {"Content-Type": "application/json", **(headers or {})}, body)

        def _error(
            self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
        ) -> None:
            extra = {
                "X-Error-Message": message,
                **({"X-Error-Code": code} if code else {}),
                **(headers or {}),
            }
            body = json.dumps({"error": message}).encode()
            self._send(
                status, {"Content-Type": "application/json", **extra}, body, head=self.command == "HEAD"
            )

        def _authorized(self, token: str | None) -> bool:
            return token is None or self.headers.get("Authorization") == f"Bearer {token}"

        def _repo(self, repo_id: str) -> Repo | None:
            """The repo, or None after answering 401 as the hub does (missing, or private without token)."""
            repo = server.repos.get(repo_id)
            if repo is None or not self._authorized(repo.token):
                message = "Invalid username or password." if repo else "Repository not found"
                self._error(401, message, "RepoNotFound")
                return None
            return repo

        def _revision_ok(self, repo: Repo, revision: str) -> bool:
            if revision in ("main", repo.sha):
                return True
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return False

        def _api(self, match: re.Match, query: Mapping[str, list[str]], body: bytes) -> None:
            repo = self._repo(unquote(match[1]))
            if repo is None:
                return
            kind, revision = match[2], unquote(match[3] or "main")
            if not self._revision_ok(repo, revision):
                return
            if kind in (None, "revision"):
                blobs = query.get("blobs", ["false"])[0].lower() not in ("false", "0", "")
                siblings = []
                for path in sorted(repo.files):
                    sibling: dict = {"rfilename": path}
                    if blobs:
                        entry = tree_entry(repo, path)
                        sibling.update(size=entry["size"], blobId=entry["oid"])
                        if "lfs" in entry:
                            sibling["lfs"] = {
                                "sha256": entry["lfs"]["oid"],
                                "size": entry["size"],
                                "pointerSize": LFS_POINTER_SIZE,
                            }
                    siblings.append(sibling)
                return self._json(
                    {
                        "_id": repo.sha[:24],
                        "id": repo.repo_id,
                        "modelId": repo.repo_id,
                        "author": repo.repo_id.split("/")[0],
                        "sha": repo.sha,
                        "private": repo.token is not None,
                        "gated": False,
                        "disabled": False,
                        "tags": ["diffusers"] if "model_index.json" in repo.files else [],
                        "siblings": siblings,
                    }
                )
            if kind == "tree":
                base = unquote(match[4] or "").strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                inside = [p for p in sorted(repo.files) if not base or p.startswith(base + "/")]
                depth = base.count("/") + 1 if base else 0
                entries = []
                for folder in sorted(_folders(inside)):
                    if (not base or folder.startswith(base + "/")) and (
                        recursive or folder.count("/") == depth
                    ):
                        entries.append(
                            {
                                "type": "directory",
                                "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                "size": 0,
                                "path": folder,
                            }
                        )
                for path in inside:
                    if recursive or path.count("/") == depth:
                        entries.append(tree_entry(repo, path))
                if base and not inside:
                    return self._error(404, f"{base} does not exist on {revision}", "EntryNotFound")
                return self._json(entries)
            # paths-info
            form = parse_qs(body.decode()) if body else {}
            if not form and body.strip().startswith(b"{"):
                form = json.loads(body)
            paths = form.get("paths", [])
            entries = [tree_entry(repo, p) for p in paths if p in repo.files]
            entries += [
                {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                for p in paths
                if p in _folders(repo.files)
            ]
            return self._json(entries)

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            repo = self._repo(repo_id)
            if repo is None or not self._revision_ok(repo, revision):
                return
            commit = {"X-Repo-Commit": repo.sha}
            served = repo.files.get(path)
            if served is None:
                return self._error(404, "Entry not found", "EntryNotFound", headers=commit)
            if repo.is_lfs(path):
                lfs = {
                    **commit,
                    "X-Linked-Etag": f'"{served.sha256}"',
                    "X-Linked-Size": str(len(served.data)),
                }
                if repo.cdn:
                    location = f"http://localhost:{server.port}/cdn-lfs/{served.sha256}?X-Amz-Signature=test"
                    return self._send(
                        302, {**lfs, "ETag": f'"{served.blob_id}"', "Location": location}, head=head
                    )
                return self._file(served, {**lfs, "ETag": f'"{served.sha256}"'}, head)
            return self._file(served, {**commit, "ETag": f'"{served.blob_id}"'}, head)

        def _cdn(self, sha256: str, head: bool) -> None:
            for repo in server.repos.values():
                for served in repo.files.values():
                    if served.sha256 == sha256:
                        return self._file(served, {"ETag": f'"{sha256}"'}, head)
            self._error(404, "NoSuchKey")

        def _plain(self, name: str, head: bool) -> None:
            plain = server.plain.get(name)
            if plain is None:
                return self._error(404, "File not found")
            if not self._authorized(plain.token):
                return self._error(401, "Unauthorized: a token is needed")
            headers = {"ETag": f'"{plain.served.sha256[:16]}"', "Content-Type": "application/octet-stream"}
            if plain.filename:
                headers["Content-Disposition"] = f'attachment; filename="{plain.filename}"'
            self._file(plain.served, headers, head)

        def _file(self, served: Served, headers: Mapping[str, str], head: bool) -> None:
            """A file's bytes (or a Range of them), meeting its next fault on a GET."""
            fault = served.faults.pop(0) if served.faults and not head else None
            if isinstance(fault, Status):
                return self._error(fault.code, f"injected {fault.code}")
            data = _corrupted(served.data) if isinstance(fault, Corrupt) else served.data
            size = len(data)
            headers = {
                **headers,
                "Accept-Ranges": "bytes" if served.ranges else "none",
                "Content-Type": headers.get("Content-Type", "application/octet-stream"),
            }
            start, end, status = 0, size - 1, 200
            requested = self.headers.get("Range") if served.ranges else None
            if requested and (match := _RANGE.match(requested.strip())) and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(int(match[2]), size - 1) if match[2] else size - 1
                else:  # the last N bytes
                    start, end = max(0, size - int(match[2])), size - 1
                if start >= size or start > end:
                    return self._send(416, {"Content-Range": f"bytes */{size}"}, head=head)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            body = data[start : end + 1]
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if isinstance(fault, Cut):
                self.wfile.write(body[: max(0, fault.at - start)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler
