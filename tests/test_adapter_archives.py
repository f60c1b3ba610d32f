"""Adapter archives and limits (issue 16): what a `lora_weights` or `embeddings` reference writes to
disk, unpacked bytes included, is at most SDCOG_MAX_ADAPTER_MB; hostile archives (bombs, nested,
many members, lying headers) are refused naming the field, quickly, leaving nothing in the cache;
a stored file that fails to load is forgotten; each size limit names its own setting."""

import functools
import io
import json
import random
import resource
import tarfile
import time
from pathlib import Path

import pytest
from hostile_archives import (
    COMPRESSIONS,
    EMBEDDING_MEMBER,
    LORA_MEMBER,
    REFUSED_WITHIN_S,
    bomb,
    compressed_member,
    data_uri,
    hostile_archives,
    huge_extended_header,
    long_name_chain,
    many_members,
    member_size_lie,
    nested,
    safetensors_header,
    skipped_bomb,
    small_safetensors,
)
from lora_files import StaticServer

from sdcog.errors import InputError
from sdcog.fetch import adapter_archives
from sdcog.fetch.adapter_cache import AdapterCache, AdapterFile
from sdcog.fetch.adapter_references import EMBEDDING, LORA, parse_reference
from sdcog.fetch.input_files import decode_data_uri

hostile_archives = functools.cache(hostile_archives)  # built once per field, for every test here
KINDS = {"lora_weights": (LORA, LORA_MEMBER), "embeddings": (EMBEDDING, EMBEDDING_MEMBER)}


def cache_for(tmp_path, limit_mb="1"):
    """A cache as the server makes it, with SDCOG_MAX_ADAPTER_MB=`limit_mb` ("" for the default)."""
    environ = {"SDCOG_ADAPTER_CACHE": str(tmp_path / "adapters"), "SDCOG_MAX_ADAPTER_MB": limit_mb}
    return AdapterCache.from_environment(environ)


def fetch(cache, field, reference):
    return cache.fetch(KINDS[field][0], parse_reference(field, reference))


def refusal(cache, field, reference) -> str:
    """The message of the InputError fetching `reference` raises, checked to name `field`, to come
    within REFUSED_WITHIN_S seconds and to leave nothing in the cache directory."""
    started = time.perf_counter()
    with pytest.raises(InputError) as error:
        fetch(cache, field, reference)
    elapsed = time.perf_counter() - started
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")
    assert elapsed < REFUSED_WITHIN_S, f"refused after {elapsed:.1f} s"
    assert leftovers(cache) == []
    return str(error.value)


def leftovers(cache):
    """What is in the cache directory besides indexes that name nothing."""
    files = sorted(path.name for path in cache.root.iterdir())
    for name in ("references.json", "trained-embeddings.json"):
        index = cache.root / name
        if index.exists() and json.loads(index.read_text()) == {}:
            files.remove(name)
    return files


def tar(members, compression=None):
    """A tar of `members` (name -> bytes), plain or `w:<compression>`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(hostile_archives()))
@pytest.mark.parametrize("field", sorted(KINDS))
def test_every_hostile_archive_is_refused_naming_the_field_and_leaves_nothing(tmp_path, field, name):
    refusal(cache_for(tmp_path), field, hostile_archives(field)[name])


def test_the_issue_16_bomb_is_refused_from_its_header_before_anything_is_unpacked(tmp_path):
    """A 20 KB data URI whose .tar.xz unpacked to a 100,000,111-byte file in the cache."""
    reference = data_uri(bomb("xz", unpacked_mb=100))
    assert len(reference) < 20_000
    message = refusal(cache_for(tmp_path), "lora_weights", reference)
    assert "the lora.safetensors in it (100 MB)" in message
    assert message.endswith("over the limit of 1 MB (SDCOG_MAX_ADAPTER_MB)")


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("field", sorted(KINDS))
def test_a_compressed_member_over_the_limit_is_refused_from_its_header(tmp_path, field, compression):
    member = KINDS[field][1]
    message = refusal(cache_for(tmp_path), field, data_uri(bomb(compression, member)))
    assert f"the {member} in it (20 MB)" in message and "(SDCOG_MAX_ADAPTER_MB)" in message


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_decompressed_stream_is_bounded_while_looking_for_the_member(tmp_path, compression):
    """getmembers() on a compressed tar decompresses it all: the padding before the member here."""
    message = refusal(cache_for(tmp_path), "lora_weights", data_uri(skipped_bomb(compression)))
    assert message.endswith("its archive decompresses past the limit of 1 MB (SDCOG_MAX_ADAPTER_MB)")


def test_a_plain_tar_whose_member_header_lies_is_refused_before_copying(tmp_path):
    cache = cache_for(tmp_path)
    over = refusal(cache, "lora_weights", data_uri(member_size_lie(20)))
    assert "the lora.safetensors in it (20 MB)" in over and "(SDCOG_MAX_ADAPTER_MB)" in over
    under = refusal(cache, "lora_weights", data_uri(member_size_lie(0.5)))
    assert "its archive is damaged or cannot be read (unexpected end of data)" in under


@pytest.mark.parametrize(
    "archive", [nested("gz"), nested(None), compressed_member("gz"), compressed_member("xz")]
)
def test_one_level_only_is_unpacked_and_an_archive_inside_is_no_safetensors(tmp_path, archive):
    message = refusal(cache_for(tmp_path), "lora_weights", data_uri(archive))
    assert "is not a safetensors file" in message


def test_a_million_members_are_refused_quickly_whatever_the_limit(tmp_path):
    reference = data_uri(many_members(1_000_000))
    for limit in ("1", ""):  # "": the default, 2000 MB, over the 512 MB the headers unpack to
        message = refusal(cache_for(tmp_path / (limit or "default"), limit), "lora_weights", reference)
        assert f"its archive has more than {adapter_archives.MAX_TAR_MEMBERS} members" in message


def test_an_archive_of_as_many_members_as_allowed_is_read(tmp_path):
    members = {f"empty-{index}": b"" for index in range(adapter_archives.MAX_TAR_MEMBERS - 1)} | {
        LORA_MEMBER: small_safetensors()
    }
    file = fetch(cache_for(tmp_path), "lora_weights", data_uri(tar(members, "gz")))
    assert file.path.read_bytes() == small_safetensors()


def test_extended_headers_are_bounded_in_size_and_in_a_row(tmp_path):
    """tarfile reads a pax header whole into memory, and a chain of them recursively."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = refusal(cache_for(tmp_path / "big", ""), "lora_weights", data_uri(huge_extended_header(200)))
    assert "an extended header of 200,000,000 bytes" in big
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < 100  # MiB
    chain = refusal(cache_for(tmp_path / "chain", ""), "lora_weights", data_uri(long_name_chain(5000)))
    assert "extended headers in a row" in chain


def test_what_the_archive_and_its_member_write_together_counts_against_the_limit(tmp_path):
    """A 0.6 MB member: in a plain tar (0.6 MB more on disk) over a 1 MB limit, gzipped within it."""
    member = small_safetensors(600_000)
    plain = refusal(cache_for(tmp_path / "plain"), "lora_weights", data_uri(tar({LORA_MEMBER: member})))
    assert "would take 1.2 MB on disk, over the limit of 1 MB (SDCOG_MAX_ADAPTER_MB)" in plain
    file = fetch(cache_for(tmp_path / "gz"), "lora_weights", data_uri(tar({LORA_MEMBER: member}, "gz")))
    assert file.path.read_bytes() == member


@pytest.mark.parametrize("compression", [None, *COMPRESSIONS])
def test_a_replicate_weights_archive_gives_each_field_its_member_in_any_compression(tmp_path, compression):
    lora, embeddings = small_safetensors(100), small_safetensors(200)
    members = {"special_params.json": b"{}", LORA_MEMBER: lora, EMBEDDING_MEMBER: embeddings}
    reference = data_uri(tar(members, compression))
    cache = cache_for(tmp_path)
    assert fetch(cache, "lora_weights", reference).path.read_bytes() == lora
    assert fetch(cache, "embeddings", reference).path.read_bytes() == embeddings


def test_an_archive_without_the_usual_member_gives_its_only_safetensors_file(tmp_path):
    lora = small_safetensors(300)
    only = {"README.md": b"hello", "weights/my-lora.safetensors": lora, "notes.txt": b"x"}
    cache = cache_for(tmp_path)
    assert fetch(cache, "lora_weights", data_uri(tar(only, "xz"))).path.read_bytes() == lora
    several = {"a.safetensors": lora, "b.safetensors": lora}
    message = refusal(cache_for(tmp_path / "several"), "lora_weights", data_uri(tar(several, "gz")))
    assert "its archive has several .safetensors files (a.safetensors, b.safetensors)" in message
    none = refusal(cache_for(tmp_path / "none"), "lora_weights", data_uri(tar({"a.txt": b"x"}, "bz2")))
    assert "holds no .safetensors file" in none


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_damaged_compressed_stream_is_refused_naming_the_field(tmp_path, compression):
    noise = random.Random(0).randbytes(100_000)  # incompressible: the member is most of the stream
    archive = tar({LORA_MEMBER: safetensors_header(len(noise)) + noise}, compression)
    for damaged in (
        archive[: len(archive) * 2 // 3],
        archive[: len(archive) // 2] + bytes(len(archive) // 2),
    ):
        message = refusal(cache_for(tmp_path), "lora_weights", data_uri(damaged))
        # bzip2 decompresses 900 KB blocks whole: a damaged first block is no archive at all.
        expected = "is not a safetensors file" if compression == "bz2" else "its archive is damaged"
        assert expected in message


@pytest.mark.usefixtures("local_urls")
def test_an_adapter_over_the_limit_names_sdcog_max_adapter_mb_not_the_input_setting(tmp_path):
    big = small_safetensors(2_000_000)
    cache = cache_for(tmp_path)
    for field in KINDS:
        message = refusal(cache, field, data_uri(big))
        assert (
            message.endswith("the limit is 1 MB (SDCOG_MAX_ADAPTER_MB)")
            and "SDCOG_MAX_INPUT_MB" not in message
        )
    # Percent-encoded (not base64), a data URI decodes to up to 4/3 of what its length suggests.
    plain_uri = "data:application/octet-stream," + "a" * 1_300_000
    assert "is 1.3 MB or more; the limit is 1 MB (SDCOG_MAX_ADAPTER_MB)" in refusal(
        cache, "lora_weights", plain_uri
    )
    server = StaticServer({"/big.safetensors": big, "/bomb.tar.xz": bomb("xz")})
    try:
        message = refusal(cache, "lora_weights", f"{server.url}/big.safetensors")
        assert message.endswith("the limit is 1 MB (SDCOG_MAX_ADAPTER_MB)")
        assert "(SDCOG_MAX_ADAPTER_MB)" in refusal(cache, "lora_weights", f"{server.url}/bomb.tar.xz")
    finally:
        server.close()
    # Image inputs keep their own setting.
    with pytest.raises(InputError, match=r"the limit is 1 MB \(SDCOG_MAX_INPUT_MB\)"):
        decode_data_uri("image", data_uri(big), 1_000_000)


def test_a_file_that_fails_to_load_is_forgotten_if_this_request_stored_it(tmp_path):
    cache = cache_for(tmp_path)
    reference = data_uri(small_safetensors(10))
    first = fetch(cache, "embeddings", reference)
    assert first.stored_by is cache and first.path.is_file()
    again = fetch(cache, "embeddings", reference)  # from the disk: not this request's to forget
    assert again.stored_by is None
    again.reject()
    assert again.path.is_file()
    first.reject()  # as a LoRA or an embedding that does not load calls it
    assert leftovers(cache) == []
    assert json.loads((cache.root / "references.json").read_text()) == {}
    fetch(cache, "embeddings", reference)
    assert cache.downloads == 2  # forgotten, so fetched again


def test_forget_removes_the_file_and_every_reference_to_it(tmp_path):
    cache = cache_for(tmp_path)
    data, other_data = small_safetensors(20), small_safetensors(30)
    other = fetch(cache, "lora_weights", data_uri(other_data))
    same_bytes = [data_uri(data), data_uri(data).replace("application/x-tar", "application/x-lora")]
    files = [fetch(cache, "lora_weights", reference) for reference in same_bytes]
    assert len(json.loads((cache.root / "references.json").read_text())) == 3
    cache.forget(files[0].sha256)
    assert not files[0].path.exists() and other.path.is_file()
    assert list(json.loads((cache.root / "references.json").read_text()).values()) == [other.sha256]
    restarted = AdapterCache(cache.root, cache.max_bytes, cache.max_file_bytes)
    for reference in [data_uri(other_data), *same_bytes]:
        fetch(restarted, "lora_weights", reference)
    assert restarted.downloads == 2


def test_an_adapter_file_made_outside_a_cache_is_never_forgotten(tmp_path):
    path = Path(tmp_path / "x.safetensors")
    path.write_bytes(small_safetensors())
    AdapterFile(path, "0" * 64, "x").reject()
    assert path.is_file()
