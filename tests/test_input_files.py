"""File inputs: URLs fetched under a size limit and timeouts, private networks refused, server
paths never read, and oversized images refused before decoding; in-process and through Cog."""

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from sdcog.errors import InputError
from sdcog.fetch import input_files
from sdcog.fetch.images import open_image
from sdcog.fetch.input_files import decode_data_uri, fetch_url, read_input_file
from sdcog.model.weights import PROJECT_ROOT
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server

LIMIT = 100_000  # bytes, for the tests


def png_bytes(size=(64, 64), colour=(0, 0, 255)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class FileServer:
    """Serves a few paths on 127.0.0.1 and counts the requests it gets."""

    def __init__(self):
        self.requests: list[str] = []
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                files.requests.append(self.path)
                if self.path == "/ok.png":
                    self.reply(png_bytes())
                elif self.path == "/big.png":
                    self.reply(b"\0" * (2 * LIMIT))
                elif self.path == "/streamed-big":  # no Content-Length: the size shows while reading
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(40):
                        self.wfile.write(b"\0" * 10_000)
                elif self.path == "/slow":
                    time.sleep(3)
                    self.reply(png_bytes())
                elif self.path == "/redirect":
                    self.redirect("/ok.png")
                elif self.path == "/loop":
                    self.redirect("/loop")
                else:
                    self.send_response(404)
                    self.end_headers()

            def reply(self, body):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def redirect(self, location):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def files():
    server = FileServer()
    yield server
    server.server.shutdown()


def refused(field, call, *args, **kwargs):
    with pytest.raises(InputError) as raised:
        call(*args, **kwargs)
    assert raised.value.field == field
    return str(raised.value)


def test_a_url_on_an_allowed_network_is_fetched_and_redirects_are_followed(files):
    assert fetch_url("image", f"{files.url}/ok.png", LIMIT, allow_local=True) == png_bytes()
    assert fetch_url("image", f"{files.url}/redirect", LIMIT, allow_local=True) == png_bytes()


def test_by_default_only_https_and_only_public_hosts_are_fetched(files):
    before = len(files.requests)
    message = refused("image", fetch_url, "image", f"{files.url}/ok.png", LIMIT, allow_local=False)
    assert "must be a data URI or an https:// URL, got a http:// URL" in message
    for url in ("https://127.0.0.1/x.png", "https://localhost/x.png", "https://10.1.2.3/x.png"):
        message = refused("mask", fetch_url, "mask", url, LIMIT, allow_local=False)
        assert "private, loopback or link-local network" in message and "SDCOG_ALLOW_LOCAL_URLS=1" in message
    message = refused("image", fetch_url, "image", "ftp://example.com/x.png", LIMIT, allow_local=True)
    assert "got a ftp:// URL" in message
    assert len(files.requests) == before  # nothing was requested


@pytest.mark.parametrize("path", ["/big.png", "/streamed-big"])
def test_a_body_over_the_limit_is_refused(files, path):
    message = refused("image", fetch_url, "image", f"{files.url}{path}", LIMIT, allow_local=True)
    assert "MB or more; the limit is 0.1 MB (SDCOG_MAX_INPUT_MB)" in message


def test_a_stalled_server_times_out(files, monkeypatch):
    monkeypatch.setattr(input_files, "READ_TIMEOUT_S", 0.3)
    started = time.monotonic()
    message = refused("image", fetch_url, "image", f"{files.url}/slow", LIMIT, allow_local=True)
    assert "timed out" in message and time.monotonic() - started < 2.5


def test_redirect_loops_and_http_errors_are_refused_with_their_reason(files):
    message = refused("image", fetch_url, "image", f"{files.url}/loop", LIMIT, allow_local=True)
    assert "redirected more than 5 times" in message
    message = refused("image", fetch_url, "image", f"{files.url}/gone.png", LIMIT, allow_local=True)
    assert "answered HTTP 404" in message


def test_data_uris_are_decoded_under_the_limit():
    assert decode_data_uri("image", data_uri(png_bytes()), LIMIT) == png_bytes()
    assert decode_data_uri("image", "data:text/plain,a%20b", LIMIT) == b"a b"
    assert "limit is 0.1 MB" in refused("image", decode_data_uri, "image", data_uri(b"x" * 2 * LIMIT), LIMIT)
    assert "without a comma" in refused("mask", decode_data_uri, "mask", "data:image/png;base64", LIMIT)
    # Percent-encoded, the text is the data's size, not 4/3 of it: the decoded size is what counts.
    plain = "data:application/octet-stream," + "a" * (LIMIT + LIMIT // 10)
    assert "the limit is 0.1 MB" in refused("image", decode_data_uri, "image", plain, LIMIT)


def test_a_plain_string_is_never_read_as_a_path_on_the_server(tmp_path):
    secret = tmp_path / "out-0.png"
    secret.write_bytes(png_bytes())
    message = refused("image", read_input_file, "image", str(secret))
    assert message.startswith("image: must be an https URL or a data URI, got '")
    assert read_input_file("image", Path(secret)) == png_bytes()  # a file Cog downloaded is read


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded():
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 megapixels in ~15 kB
    message = refused("image", open_image, "image", buffer.getvalue())
    assert message == "image: is 10000x10000 pixels; the limit is 50 megapixels (scale it down first)"
    assert "not a readable image" in refused("mask", open_image, "mask", b"<html>not found</html>")


# Through the real Cog server: Cog hands URLs to predict() instead of downloading them itself.

INPUTS = {"prompt": "a red circle", "num_inference_steps": 2, "prompt_strength": 0.5, "seed": 1}


@pytest.fixture(scope="module")
def default_server(tiny_sd15):
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    env = {"MODEL_WEIGHTS": str(tiny_sd15), "SDCOG_MAX_INPUT_MB": "0.1"}
    with running_server(PROJECT_ROOT, env=env) as server:
        yield server


def failure(server, **inputs):
    """The error of a failed prediction, without the "Prediction failed: ...InputError: " Cog adds."""
    body = server.predict({**INPUTS, **inputs}).json()
    assert body["status"] == "failed", body
    return body["error"].split("InputError: ", 1)[-1]


def test_the_server_refuses_local_urls_without_fetching_them(default_server, files):
    before = len(files.requests)
    error = failure(default_server, image=f"{files.url}/ok.png")
    assert error == "image: must be a data URI or an https:// URL, got a http:// URL"
    assert len(files.requests) == before  # Cog did not download it before predict() either


def test_the_server_refuses_paths_and_oversized_data_uris(default_server):
    assert failure(default_server, image="/etc/hostname").startswith(
        "image: must be an https URL or a data URI"
    )
    error = failure(default_server, image=data_uri(png_bytes()), mask=data_uri(b"\0" * 2 * LIMIT))
    assert error.startswith("mask: is 0.2 MB or more; the limit is 0.1 MB")
    body = default_server.predict({**INPUTS, "image": data_uri(png_bytes())}).json()
    assert body["status"] == "succeeded", body.get("error")


def test_a_server_allowed_local_urls_fetches_them_under_its_limit(tiny_sd15, files):
    env = {"MODEL_WEIGHTS": str(tiny_sd15), "SDCOG_MAX_INPUT_MB": "0.1", "SDCOG_ALLOW_LOCAL_URLS": "1"}
    with running_server(PROJECT_ROOT, env=env) as server:
        body = server.predict({**INPUTS, "image": f"{files.url}/ok.png"}).json()
        assert body["status"] == "succeeded", body.get("error")
        assert failure(server, image=f"{files.url}/big.png").startswith("image: is 0.2 MB or more")
        assert server.settled_status() == "READY"


@pytest.mark.parametrize(
    "reference",
    [
        "https://☃.invalid/x.png",
        "https://[abc/x.png",
        "data:",
        "data:image/png;base64",
        "data:;base64,iVBORw0KGgo",
    ],
)
def test_malformed_references_are_refused_naming_the_field(default_server, reference):
    """Cog's own parsing of these fails before predict() without naming the field; they reach
    predict() untouched instead, and are refused there."""
    error = failure(default_server, image=reference)
    assert error.startswith("image: "), error
