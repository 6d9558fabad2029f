"""Section 2: the four test vectors (pure, no broker)."""

import pytest

from baton_client import fnv1a64, partition

VECTORS = [
    ("a", 0xAF63DC4C8601EC8C, 12),
    ("project:42/src/main.rs", 0x60D5B37C6A87ED46, 6),
    ("channel:7", 0xA872C4F5096EDBD7, 7),
    ("буфер/ü.rs", 0xEC25F925035522F2, 2),
]


@pytest.mark.parametrize("buffer,hash_,p", VECTORS, ids=[v[0] for v in VECTORS])
def test_vectors(buffer, hash_, p):
    assert fnv1a64(buffer) == hash_
    assert fnv1a64(buffer.encode("utf-8")) == hash_
    assert partition(buffer, 16) == p
    assert partition(buffer) == p


def test_partition_range_and_n():
    for n in (1, 2, 7, 16, 1024):
        for b, _, _ in VECTORS:
            assert 0 <= partition(b, n) < n
    assert partition("anything", 1) == 0
    for bad in (0, 1025, -1, True, 2.0):
        with pytest.raises(ValueError):
            partition("a", bad)


def test_utf8_not_utf16():
    # "😀" is one code point, 4 UTF-8 bytes; hashing UTF-16 units would differ.
    assert fnv1a64("😀") == fnv1a64("😀".encode("utf-8"))
    assert fnv1a64("😀") != fnv1a64("😀".encode("utf-16-le"))
