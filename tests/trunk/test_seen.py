"""The content-hash set a trunk records of its training images."""

from __future__ import annotations

import hashlib

import pytest

from trunk.seen import SeenError, SeenImages, content_sha


def _shas(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_membership_is_by_content_not_name(image_factory):
    a = image_factory("a.png", color=(10, 20, 30))
    same_bytes = a.parent / "renamed.png"
    same_bytes.write_bytes(a.read_bytes())
    other = image_factory("b.png", color=(200, 20, 30))
    seen = SeenImages([content_sha(a)])
    assert content_sha(same_bytes) in seen
    assert content_sha(other) not in seen
    assert seen.mask([content_sha(other), content_sha(same_bytes)]) == [False, True]


def test_duplicates_union_and_digest():
    a, b = SeenImages(_shas(10) + _shas(10)), SeenImages(_shas(15)[5:])
    assert len(a) == 10 and len(b) == 10
    both = a.union(b)
    assert len(both) == 15 and both.digest == SeenImages(_shas(15)).digest
    assert a.digest != b.digest
    assert SeenImages().count_in(_shas(3)) == 0 and SeenImages().mask([]) == []


def test_save_load_round_trip_and_tampering_is_refused(tmp_path):
    seen = SeenImages(_shas(100))
    path = seen.save(tmp_path / "seen.safetensors")
    back = SeenImages.load(path, expected_digest=seen.digest)
    assert back.count_in(_shas(120)) == 100
    with pytest.raises(SeenError, match="was recorded"):
        SeenImages.load(path, expected_digest=SeenImages(_shas(99)).digest)
    # Flip one stored byte: the contents no longer hash to the digest in the metadata.
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SeenError, match="altered"):
        SeenImages.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(SeenError, match="cannot be read"):
        SeenImages.load(tmp_path / "junk.safetensors")


def test_a_bad_hash_is_refused():
    with pytest.raises(ValueError, match="not a sha256"):
        SeenImages(["abc"])
