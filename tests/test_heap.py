"""Freed heap memory goes back to the OS after a prediction (glibc keeps it otherwise)."""

import psutil
import pytest

from sdcog.heap import HeapTrimmer

trimmer = HeapTrimmer()
pytestmark = pytest.mark.skipif(not trimmer.available, reason="not glibc 2.33+")


def fragment_the_heap():
    """Allocate ~120 MB in 60 kB blocks (under glibc's mmap threshold) and free every other one."""
    blocks = [bytes(60_000) + bytes([i % 256]) for i in range(2_000)]
    kept = blocks[::2]
    del blocks
    return kept


def test_trimming_returns_freed_heap_memory_to_the_os():
    kept = fragment_the_heap()
    held = trimmer.free_bytes()
    assert held > 40 * 2**20
    before = psutil.Process().memory_info().rss
    assert trimmer.trim()
    after = psutil.Process().memory_info().rss
    assert before - after > 30 * 2**20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    assert len(kept) == 1_000


def test_little_free_memory_is_left_alone():
    assert not HeapTrimmer(min_free_bytes=2**50).trim()
