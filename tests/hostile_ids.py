"""Prediction ids Cog's server must never be sent, and ids it must keep taking.

Cog's server (coglet 0.23.1) makes a folder /tmp/coglet/predictions/<id> for every prediction,
with the id as it arrives: the decoded URL segment of PUT /predictions/<id>, or the `id` of a
POST /predictions body (measured; tests/test_stuck_slot.py shows each kind on the real server):

- WEDGING_IDS: it cannot make the folder, answers HTTP 200 with `"status": "failed"` and
  `Failed to create output dir: File name too long (os error 36)` (more than 255 bytes: length
  is counted in UTF-8 bytes) or `... file name contained an unexpected NUL byte`, and its only
  slot stays BUSY for good: every later request gets 409.
- ESCAPING_IDS: it makes the folder elsewhere: `..` climbs out of /tmp/coglet/predictions, an
  absolute id replaces the whole path (Rust's Path::join), `/` nests folders. The prediction runs.
- ODD_IDS: the server takes them today, but they break the deployment's rule (deploy/front.py:
  1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`): empty, blank, control characters, non-ASCII,
  dots, URL and path punctuation, 65 characters.

Values are ids as the server reads them; `url_segment(id)` is how a client puts one in a URL.
HOSTILE_URL_SEGMENTS are raw path segments (sent as is, no client-side normalisation) that
decode to hostile ids. NON_STRING_IDS are JSON values for a body's `id`.
"""

from __future__ import annotations

from urllib.parse import quote

WEDGING_IDS = {
    "256 characters": "a" * 256,
    "256 bytes of UTF-8 (128 characters)": "é" * 128,
    "NUL": "a\x00b",
}
ESCAPING_IDS = {
    "parent": "../x",
    "two parents": "../../x",
    "slash": "a/b",
    "absolute": "/tmp/x",
}
ODD_IDS = {
    "empty": "",
    "space": " ",
    "spaces around": " id ",
    "newline": "a\nb",
    "tab": "a\tb",
    "unicode": "ünï",
    "emoji": "\U0001f600",
    "dot": ".",
    "two dots": "..",
    "percent escape": "a%2Fb",
    "question mark": "a?b",
    "hash": "a#b",
    "backslash": "a\\b",
    "65 characters": "a" * 65,
}
HOSTILE_IDS = {**WEDGING_IDS, **ESCAPING_IDS, **ODD_IDS}

HOSTILE_URL_SEGMENTS = {
    "..%2F..%2Fx": "..%2F..%2Fx",
    "%2e%2e%2fx": "%2e%2e%2fx",
    "a%2Fb": "a%2Fb",
    "NUL": "a%00b",
    "256 characters": "a" * 256,
    "unicode": "%C3%BCn%C3%AF",
    "space": "%20",
    "empty": "",
    "two dots": "..",
    "dot": ".",
}

NON_STRING_IDS = {"number": 123, "true": True, "array": ["a"], "object": {"id": "a"}}

VALID_IDS = {
    "coglet's own, for a request without one": "pred_18ec93bf75f1ae52",
    "Replicate's": "ufawqhfynnddngldkgtslldrkq",
    "UUID": "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
    "one character": "a",
    "64 characters": "Az09_-" * 10 + "Zz9_",
}


def url_segment(prediction_id: str) -> str:
    """The id %-escaped for a URL path, as HTTP clients send it (`/` included)."""
    return quote(prediction_id, safe="")
