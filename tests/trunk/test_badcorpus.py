"""The generated bad-input corpus through read_bytes + decode_image: every kind as expected."""

import numpy as np
import pytest
from PIL import Image

from tests.badcorpus import KINDS, BadCase, make_bad_corpus, make_good_images, vanish
from trunk.decode import ImageError, decode_image, load_image, read_bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, BadCase]:
    return {c.kind: c for c in make_bad_corpus(tmp_path_factory.mktemp("bad"))}


def _decode(case: BadCase, draft_side: int | None = None) -> Image.Image:
    return decode_image(read_bytes(str(case.path)), str(case.path), draft_side=draft_side)


def test_all_kinds_are_built(corpus):
    assert tuple(corpus) == KINDS and len(KINDS) == 13
    assert all(c.path.is_absolute() for c in corpus.values())
    assert all((c.reference is not None) == c.ok for c in corpus.values())


@pytest.mark.parametrize("draft_side", [None, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_decodes_as_expected(corpus, kind, draft_side):
    case = corpus[kind]
    if case.ok:
        img = _decode(case)
        assert img.mode == "RGB"
        assert case.matches(img), f"{kind}: off by {case.difference(img):.2f} levels (tolerance {case.tolerance})"
        assert _decode(case, draft_side=draft_side).mode == "RGB"
    else:
        with pytest.raises(ImageError) as e:
            _decode(case, draft_side=draft_side)
        assert e.value.reason == case.expect, str(e.value)
        assert "\n" not in str(e.value)


def test_references_catch_wrong_decodes(corpus):
    # The references are strict enough to tell a right decode from the usual wrong ones.
    rotated = corpus["exif_rotated"]
    with Image.open(rotated.path) as raw:
        unrotated = np.asarray(raw.convert("RGB"))
    assert not rotated.matches(np.rot90(unrotated, k=1))  # turned the wrong way
    assert not corpus["png_16bit"].matches(np.full_like(corpus["png_16bit"].reference, 255))  # clipped
    cmyk = corpus["cmyk_jpeg"]
    assert not cmyk.matches(255 - np.asarray(_decode(cmyk)))  # inverted Adobe CMYK


def test_vanishing_after_listing(tmp_path):
    cases = make_bad_corpus(tmp_path, size=16, keep_vanishing=True)
    gone = next(c for c in cases if c.kind == "vanished")
    listed = sorted(tmp_path.iterdir())
    assert gone.path in listed
    vanish(gone)
    with pytest.raises(ImageError) as e:
        load_image(gone.path)
    assert e.value.reason == gone.expect == "file not found"


def test_corpus_is_deterministic(tmp_path):
    a, b = make_bad_corpus(tmp_path / "a", size=24), make_bad_corpus(tmp_path / "b", size=24)
    for x, y in zip(a, b, strict=True):
        assert x.kind == y.kind and x.path.name == y.path.name
        if x.path.is_file():
            assert x.path.read_bytes() == y.path.read_bytes()


def test_good_images(tmp_path):
    paths = make_good_images(tmp_path, 4, size=20)
    assert [p.suffix for p in paths] == [".jpg", ".png", ".jpg", ".png"]
    assert all(load_image(p)[0].size == (20, 20) for p in paths)
