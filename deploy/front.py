"""The sample deployment's front: refuses prediction ids Cog's server cannot take, forwards the rest.

    python /src/deploy/front.py [--host 0.0.0.0] [--port 8080]   # to the server on 127.0.0.1:$PORT

Cog's server (coglet 0.23.1) makes a folder for each prediction, /tmp/coglet/predictions/<id>,
with the id as the client sent it: in the URL of PUT /predictions/<id> or as the `id` of a POST
body. An id it cannot make that folder for (over 255 bytes, or with a NUL) fails the prediction
and leaves the server's only slot BUSY for good: every later request gets 409. One with `/` or
`..` (`..%2F` in a URL) makes the folder outside its own. So ids are held to one rule here:

    1 to 64 characters, each a letter A-Z or a-z, a digit, `_` or `-`

which admits Replicate's ids (26 lowercase letters and digits), UUIDs, and the ids the server makes
itself when a request has none (`pred_` and hex digits). An id that breaks it is refused with 422
and `{"detail": [{"loc": ["path", "id"] or ["body", "id"], "msg": ..., "type": "value_error"}]}`,
the shape of the server's own 422s, before the server sees it.

Forwarded: GET /, /health-check and /openapi.json; POST /predictions, PUT /predictions/<id> and
POST /predictions/<id>/cancel (and the same for /trainings). Any other path gets 404 here,
POST /shutdown among them (it stops the server). Bodies: at most 100 MiB (the server's own limit),
with a Content-Length (411 for a chunked one). A client that hangs up before its synchronous
prediction is answered makes the front hang up on the server, which cancels the prediction, as
without the front. On SIGTERM it stops accepting and exits once the requests it holds are answered.
Stdlib only: it runs in the model's image, with its `python`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ID_RULE = "1 to 64 characters, each a letter A-Z or a-z, a digit, _ or -"
VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROUTE = re.compile(r"/(?:predictions|trainings)(?:/(?P<id>[^/]*)(?P<cancel>/cancel)?)?")
PLAIN_ROUTES = {"/", "/health-check", "/openapi.json"}
MAX_BODY = 100 * 1024 * 1024  # coglet's MAX_HTTP_BODY_SIZE
DEFAULT_UPSTREAM_PORT = "5000"
CONNECT_TIMEOUT = 10
RACE_RETRIES = 3
RACE_DELAY = 0.02
"""A 409 to a new prediction is asked again after 20, 40 and 60 ms (see `forward`): a full server
still answers 409, 120 ms later."""
# Not forwarded: hop-by-hop headers (RFC 9110), and the framing the front sets itself.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}


def id_refusal(where: str, value: object) -> dict:
    if isinstance(value, str):
        shown = repr(value[:40]) + (f"... ({len(value)} characters)" if len(value) > 40 else "")
    else:
        kinds = {"dict": "object", "list": "array", "bool": "boolean", "int": "number", "float": "number"}
        shown = f"a JSON {kinds[type(value).__name__]}"
    return {
        "detail": [{"loc": [where, "id"], "msg": f"id must be {ID_RULE}; got {shown}", "type": "value_error"}]
    }


def refusal(path: str, body: bytes) -> tuple[int, dict] | None:
    """(HTTP status, JSON answer) for a request the server must not see; None to forward it."""
    if path in PLAIN_ROUTES:
        return None
    route = ROUTE.fullmatch(path)
    if route is None:
        return 404, {"detail": "Not Found"}
    if route["id"] is not None and not VALID_ID.fullmatch(route["id"]):
        return 422, id_refusal("path", route["id"])  # as sent: a %-escape is refused too
    if route["cancel"] or not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return 400, {"detail": "the body is not JSON"}
    # Python's json takes the last of repeated keys, the server (serde) refuses them: no id slips by.
    if isinstance(request, dict) and request.get("id") is not None:
        if not (isinstance(request["id"], str) and VALID_ID.fullmatch(request["id"])):
            return 422, id_refusal("body", request["id"])
    return None


class Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # every answer closes its connection, delimited or not
    server_version = "sdcog-front"
    timeout = 60  # for reading a request; the server's answer is awaited without a limit
    server: FrontServer

    def do_GET(self) -> None:
        self.close_connection = True
        if self.headers.get("Transfer-Encoding"):
            return self.answer(411, {"detail": "send the body with a Content-Length"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return self.answer(413 if length > 0 else 400, {"detail": "bad or too large Content-Length"})
        body = self.rfile.read(length)
        if len(body) < length:
            return  # the client hung up
        refused = refusal(self.path.partition("?")[0], body)
        if refused:
            return self.answer(*refused)
        self.forward(body)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def forward(self, body: bytes) -> None:
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        for attempt in range(RACE_RETRIES + 1):
            upstream = http.client.HTTPConnection(
                "127.0.0.1", self.server.upstream_port, timeout=CONNECT_TIMEOUT
            )
            try:
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                if not self.client_waits_for(upstream.sock):
                    return
                upstream.sock.settimeout(None)
                response = upstream.getresponse()
            except (OSError, http.client.HTTPException) as error:
                upstream.close()
                where = f"127.0.0.1:{self.server.upstream_port}"
                return self.answer(502, {"detail": f"the server on {where} did not answer: {error}"})
            if response.status == 409 and self.command in ("POST", "PUT") and attempt < RACE_RETRIES:
                # coglet 0.23 answers 409 to a request that arrives while another takes a slot, even
                # with slots free (its pool's try_lock); a moment later the request gets one.
                response.read()
                upstream.close()
                time.sleep(RACE_DELAY * (attempt + 1))
                continue
            break
        try:
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP | {"server", "date"}:
                    self.send_header(name, value)
            if response.getheader("Content-Length") is not None:
                self.send_header("Content-Length", response.getheader("Content-Length"))
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
        except (OSError, http.client.HTTPException):
            pass  # the client hung up mid-answer, or the server did
        finally:
            upstream.close()

    def client_waits_for(self, upstream: socket.socket) -> bool:
        """Wait for the server's answer; False, after hanging up on the server, if the client left."""
        readable, _, _ = select.select([self.connection, upstream], [], [])
        if upstream in readable:
            return True
        try:
            left = not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            left = True
        if left:
            upstream.close()  # the server cancels a synchronous prediction whose client is gone
            return False
        select.select([upstream], [], [])  # the client sent more bytes: stop watching it
        return True

    def answer(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # ascii(): a hostile path's control characters and non-ASCII bytes stay escaped in the log.
        sys.stderr.write(f"{self.address_string()} {ascii(format % args)[1:-1]}\n")


class FrontServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in progress
    block_on_close = True

    def __init__(self, address: tuple[str, int], upstream_port: int):
        super().__init__(address, Front)
        self.upstream_port = upstream_port


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    upstream_port = int(os.environ.get("PORT", DEFAULT_UPSTREAM_PORT))
    server = FrontServer((args.host, args.port), upstream_port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"front on {args.host}:{server.server_address[1]}, to 127.0.0.1:{upstream_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
