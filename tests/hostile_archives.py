"""Hostile archives for `lora_weights` and `embeddings` (issue 16): compression bombs, nested
archives, too many members, headers that lie. Each builder returns the archive's bytes (wrap them
with `data_uri` to send them as a reference); `hostile_archives` gives them all as data URIs.

They are sized for a server run with SDCOG_MAX_ADAPTER_MB=1 (`LIMIT_MB`): each is far under the
limit as sent (a few KB to a few hundred KB) and far over it unpacked (20 MB to 512 MB), and each
is cheap to build: zeros are compressed 1 MB at a time (or a compressed 1 MB stream is repeated,
for the largest), never held whole. Unless a docstring says otherwise, what the server must answer
is: the prediction fails with an error naming the field (`lora_weights`, or `embeddings` for an
archive built with `member="embeddings.pti"`) within `REFUSED_WITHIN_S` seconds, and the adapter
cache directory (SDCOG_ADAPTER_CACHE) holds nothing new afterwards (no `.safetensors` file, no
`incoming-*` directory, no reference to it in `references.json`).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import lzma
import struct
import tarfile
import zlib
from collections.abc import Iterable, Iterator

MB = 1_000_000  # the server's MB (SDCOG_MAX_ADAPTER_MB * 1e6 bytes)
LIMIT_MB = 1
"""The SDCOG_MAX_ADAPTER_MB the builders' default sizes are made for."""
REFUSED_WITHIN_S = 5
COMPRESSIONS = ("gz", "bz2", "xz")
LORA_MEMBER = "lora.safetensors"
EMBEDDING_MEMBER = "embeddings.pti"
_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(1 << 20)


def data_uri(archive: bytes) -> str:
    """`archive` as a reference that `lora_weights` and `embeddings` take."""
    return "data:application/x-tar;base64," + base64.b64encode(archive).decode()


def safetensors_header(data_size: int) -> bytes:
    """The start of a valid safetensors file whose one tensor (U8) is the `data_size` bytes after it."""
    header = json.dumps({"weight": {"dtype": "U8", "shape": [data_size], "data_offsets": [0, data_size]}})
    header += " " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header.encode()


def small_safetensors(data_size: int = 64) -> bytes:
    """A whole valid safetensors file of `data_size` zeros (not a LoRA, not an embedding)."""
    return safetensors_header(data_size) + bytes(data_size)


def bomb(compression: str = "xz", member: str = LORA_MEMBER, unpacked_mb: float = 20 * LIMIT_MB) -> bytes:
    """The bomb of issue 16: a `.tar.<compression>` ("gz", "bz2" or "xz") of a few KB whose one
    member, `member`, is a valid safetensors file of `unpacked_mb` MB (a header, then zeros).

    Expect: refused naming the field and SDCOG_MAX_ADAPTER_MB within REFUSED_WITHIN_S seconds
    (from the member's header, before anything is copied); nothing left in the cache directory.
    Before the fix it was unpacked into the cache (100,000,111 bytes from 20 KB) and stayed."""
    size = int(unpacked_mb * MB)
    return _compressed(_member(member, safetensors_header(size), size) + [_END], compression)


def skipped_bomb(
    compression: str = "xz", member: str = LORA_MEMBER, unpacked_mb: float = 20 * LIMIT_MB
) -> bytes:
    """A `.tar.<compression>` whose first member, `padding.bin`, is `unpacked_mb` MB of zeros that
    are nobody's business, then a small valid safetensors `member`. Reaching the member means
    decompressing the padding (tarfile's getmembers() did, whole, however large).

    Expect: refused naming the field and SDCOG_MAX_ADAPTER_MB within REFUSED_WITHIN_S seconds (the
    decompressed stream is counted as it is read); nothing left in the cache directory."""
    size = int(unpacked_mb * MB)
    parts = [*_member("padding.bin", b"", size), *_member(member, small_safetensors()), _END]
    return _compressed(parts, compression)


def nested(compression: str | None = "gz", member: str = LORA_MEMBER) -> bytes:
    """A tar (`.tar.<compression>`, or plain for None) whose `member` is itself an archive: the xz
    `bomb` (20 MB unpacked). One level only is unpacked, so the member is copied as it is (a few KB)
    and is no safetensors file.

    Expect: refused naming the field ("is not a safetensors file") within REFUSED_WITHIN_S
    seconds; nothing left in the cache directory."""
    inner = bomb("xz", member)
    return _compressed([*_member(member, inner), _END], compression)


def compressed_member(compression: str = "gz", member: str = LORA_MEMBER) -> bytes:
    """A `.tar.<compression>` whose `member` is a valid safetensors file, gzipped.

    Expect: refused naming the field ("is not a safetensors file") within REFUSED_WITHIN_S
    seconds; nothing left in the cache directory."""
    return _compressed([*_member(member, gzip.compress(small_safetensors())), _END], compression)


def many_members(count: int = 1_000_000, compression: str = "bz2") -> bytes:
    """A `.tar.<compression>` of `count` empty members (512 MB of headers for a million; 73 KB as
    bz2, 160 KB as xz, 2.3 MB as gz): a server that lists every member first spends minutes and
    gigabytes on it.

    Expect: refused naming the field within REFUSED_WITHIN_S seconds whatever SDCOG_MAX_ADAPTER_MB
    (the default 2000 too: the member count is capped); nothing left in the cache directory."""
    header = _header("empty", 0)
    per_stream = 2048  # 1 MiB of headers, compressed once and repeated
    full, rest = divmod(count, per_stream)
    streams = [_compress_one(header * per_stream, compression)] * full
    streams.append(_compress_one(header * rest + _END, compression))
    return b"".join(streams)


def member_size_lie(
    claimed_mb: float = 20 * LIMIT_MB, compression: str | None = None, member: str = LORA_MEMBER
) -> bytes:
    """A tar (plain, or `.tar.<compression>`) whose `member`'s header says `claimed_mb` MB while
    the archive holds a small valid safetensors file (and the end of the archive) after it.

    Expect: refused naming the field within REFUSED_WITHIN_S seconds; over the limit (the default
    20 MB) the refusal names SDCOG_MAX_ADAPTER_MB and comes from the header, before any copying;
    under it, the archive is damaged (its data ends early). Nothing left in the cache directory."""
    data = small_safetensors()
    parts = [_header(member, int(claimed_mb * MB)), data, bytes(-len(data) % _BLOCK), _END]
    return _compressed(parts, compression)


def huge_extended_header(
    header_mb: float = 200, compression: str = "bz2", member: str = LORA_MEMBER
) -> bytes:
    """A `.tar.<compression>` whose first header is a pax extended header of `header_mb` MB (zeros),
    then a small valid `member`: tarfile reads an extended header whole into memory.

    Expect: refused naming the field within REFUSED_WITHIN_S seconds, with any SDCOG_MAX_ADAPTER_MB
    (the default 2000 too), without the server's memory growing by `header_mb`; nothing left in
    the cache directory."""
    size = int(header_mb * MB)
    pax = _header("././@PaxHeader", size, tarfile.XHDTYPE)
    unit = _compress_one(_ZEROS, compression)
    full, rest = divmod(size, len(_ZEROS))
    tail = (
        bytes(rest) + bytes(-size % _BLOCK) + b"".join(_chunks(_member(member, small_safetensors()))) + _END
    )
    return _compress_one(pax, compression) + unit * full + _compress_one(tail, compression)


def long_name_chain(count: int = 5000, compression: str = "gz", member: str = LORA_MEMBER) -> bytes:
    """A `.tar.<compression>` of `count` GNU long-name headers in a row, then a small valid `member`:
    tarfile reads such a chain recursively (a RecursionError, no field named, before the fix).

    Expect: refused naming the field within REFUSED_WITHIN_S seconds; nothing left in the cache
    directory."""
    name = b"x" * 100 + b"\0"
    long_name = (
        _header("././@LongLink", len(name), tarfile.GNUTYPE_LONGNAME) + name + bytes(_BLOCK - len(name))
    )
    parts = [long_name] * count + [*_member(member, small_safetensors()), _END]
    return _compressed(parts, compression)


def hostile_archives(field: str = "lora_weights") -> dict[str, str]:
    """Every builder's archive for `field` (`lora_weights` or `embeddings`), by name, as data URIs;
    for a server run with SDCOG_MAX_ADAPTER_MB=1. What it must answer: the module's docstring."""
    member = LORA_MEMBER if field == "lora_weights" else EMBEDDING_MEMBER
    archives = {f"bomb.tar.{c}": bomb(c, member) for c in COMPRESSIONS}
    archives |= {f"skipped-bomb.tar.{c}": skipped_bomb(c, member) for c in COMPRESSIONS}
    archives |= {
        "nested.tar.gz": nested("gz", member),
        "nested.tar": nested(None, member),
        "compressed-member.tar.gz": compressed_member("gz", member),
        "many-members.tar.bz2": many_members(),
        "member-size-lie.tar": member_size_lie(member=member),
        "member-size-lie-under-the-limit.tar.xz": member_size_lie(0.5 * LIMIT_MB, "xz", member),
        "huge-extended-header.tar.bz2": huge_extended_header(member=member),
        "long-name-chain.tar.gz": long_name_chain(member=member),
    }
    return {name: data_uri(archive) for name, archive in archives.items()}


_END = bytes(2 * _BLOCK)  # the end of a tar: two blocks of zeros


def _header(name: str, size: int, type: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type
    return info.tobuf(tarfile.GNU_FORMAT)


def _member(name: str, start: bytes, zeros: int = 0) -> list[bytes | int]:
    """A member holding `start` then `zeros` zero bytes (an int in the list: see `_chunks`)."""
    size = len(start) + zeros
    return [_header(name, size), start, zeros, bytes(-size % _BLOCK)]


def _chunks(parts: Iterable[bytes | int]) -> Iterator[bytes]:
    """The bytes of `parts`, an int standing for that many zeros, yielded 1 MiB at most at a time."""
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        while part > 0:
            yield _ZEROS[: min(part, len(_ZEROS))]
            part -= len(_ZEROS)


def _compressor(compression: str):
    if compression == "gz":
        return zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    if compression == "bz2":
        return bz2.BZ2Compressor(9)
    if compression == "xz":
        return lzma.LZMACompressor(preset=0)  # 20 MB of zeros in 0.15 s; the ratio is the same
    raise ValueError(f"unknown compression {compression!r}")


def _compressed(parts: Iterable[bytes | int], compression: str | None) -> bytes:
    """One stream of `parts`, compressed as it goes; None: a plain tar."""
    if compression is None:
        return b"".join(_chunks(parts))
    compressor = _compressor(compression)
    out = [compressor.compress(chunk) for chunk in _chunks(parts)]
    return b"".join([*out, compressor.flush()])


def _compress_one(data: bytes, compression: str) -> bytes:
    """A complete stream of `data`; streams in a row are one archive to gzip, bzip2 and xz readers."""
    return _compressed([data], compression)
