"""safetensors files read without loading them: the header, and the hashes the metadata records.

A safetensors file is an 8-byte little-endian header length, a JSON header of that many bytes (an
entry per tensor with its data offsets, and an optional "__metadata__"), then the tensors' data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header."""
_CHUNK = 1 << 20


class NotSafetensors(ValueError):
    """The file does not start with a safetensors header that fits it."""


def header_length(start: bytes) -> int | None:
    """The header length the first 8 bytes of a file give; None when there are fewer."""
    return int.from_bytes(start[:8], "little") if len(start) >= 8 else None


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of the file at `path`, or NotSafetensors."""
    size = path.stat().st_size
    with path.open("rb") as file:
        length = header_length(file.read(8))
        if length is None or not 1 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise NotSafetensors(f"{path} does not start with a safetensors header that fits it")
        try:
            header = json.loads(file.read(length))
        except (ValueError, UnicodeDecodeError) as error:
            raise NotSafetensors(f"{path}: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise NotSafetensors(f"{path}: its header is not a JSON object")
    return length, header


def described_size(length: int, header: dict) -> int:
    """The file size a safetensors header describes: 8 + the header + the end of its last tensor's
    data (a whole file has exactly this size). NotSafetensors when an entry is not a tensor."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list):
            raise NotSafetensors(f"its header entry {name!r} is not a tensor")
        end = max(end, int(entry["data_offsets"][1]))
    return 8 + length + end


def sha256_of(path: Path, start: int = 0) -> str:
    """The sha256 of the file's bytes from `start` on, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(start)
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_data_sha256(path: Path) -> str:
    """The sha256 of the bytes after the header: AUTOMATIC1111's "addnet" hash of a LoRA, which
    Civitai indexes LoRAs by."""
    length, _ = read_header(path)
    return sha256_of(path, 8 + length)
