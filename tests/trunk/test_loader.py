"""iter_decoded: order, per-file errors, and every pixel row belonging to its own file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trunk.decode import decode_image, sha256_bytes
from trunk.loader import DecodedBatch, iter_decoded
from trunk.preprocess import eval_transform


@pytest.fixture(scope="module")
def transform(tiny_trunk):
    return eval_transform(tiny_trunk.data_config)


def _inputs(image_factory, tmp_path: Path) -> tuple[list[Path], set[int]]:
    """Ten inputs, four of them bad in different ways; returns (paths, bad positions)."""
    paths = [image_factory(f"img{i}.png", color=(25 * i, 100, 255 - 25 * i), seed=i) for i in range(6)]
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(paths[0].read_bytes()[:60])
    missing = tmp_path / "missing.png"
    paths[1:1] = [not_image]
    paths[4:4] = [empty, truncated]
    paths.append(missing)
    bad = {i for i, p in enumerate(paths) if p in (not_image, empty, truncated, missing)}
    return paths, bad


def _collect(paths, transform, **kw) -> list[DecodedBatch]:
    return list(iter_decoded(paths, transform, **kw))


def test_order_errors_and_rows_match_their_own_files(image_factory, tmp_path, transform):
    paths, bad = _inputs(image_factory, tmp_path)
    batches = _collect(paths, transform, batch_size=3)

    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert [i for b in batches for i in b.indices] == list(range(len(paths)))
    for b in batches:
        assert b.paths == [str(paths[i]) for i in b.indices]
        assert b.pixels.shape[0] == len(b.ok)
        for row, pos in enumerate(b.ok):
            path = paths[b.indices[pos]]
            expected = transform(decode_image(path.read_bytes()))
            # The row is this file's own pixels, not a neighbour's or a placeholder.
            assert torch.equal(b.pixels[row], expected)
            assert b.shas[pos] == sha256_bytes(path.read_bytes())
        for pos, idx in enumerate(b.indices):
            assert (b.errors[pos] is not None) == (idx in bad)

    by_name = {Path(p).name: (s, e) for b in batches for p, s, e in zip(b.paths, b.shas, b.errors)}
    assert by_name["notes.jpg"][1].startswith("not an image") and "notes.jpg" in by_name["notes.jpg"][1]
    assert by_name["empty.png"][1].startswith("empty file")
    assert by_name["trunc.png"][1].startswith(("truncated image", "corrupt image"))
    assert by_name["missing.png"] == (None, f"file not found: {tmp_path / 'missing.png'}")
    # Readable but undecodable files still get a content hash.
    assert by_name["empty.png"][0] == sha256_bytes(b"")
    assert all("\n" not in e for _, e in by_name.values() if e)


def test_batch_with_no_good_file_has_empty_pixels(tmp_path, transform):
    (tmp_path / "a.jpg").write_text("x")
    (batch,) = _collect([tmp_path / "a.jpg", tmp_path / "nope.png"], transform, batch_size=8)
    assert batch.ok == [] and batch.pixels.shape[0] == 0
    assert batch.shas[1] is None and batch.errors[1].startswith("file not found")


def test_workers_give_the_same_batches(image_factory, tmp_path, transform):
    paths, _ = _inputs(image_factory, tmp_path)
    serial = _collect(paths, transform, batch_size=4)
    parallel = _collect(paths, transform, batch_size=4, num_workers=2)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert (a.indices, a.paths, a.shas, a.errors) == (b.indices, b.paths, b.shas, b.errors)
        assert torch.equal(a.pixels, b.pixels)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _only_small(img: Image.Image) -> torch.Tensor:
    # A real transform with a real limit: refuses images over 50 px wide.
    if img.width > 50:
        raise ValueError(f"width {img.width} over 50")
    return pil_to_tensor(img.resize((16, 16))).float() / 255


def test_transform_failure_is_a_per_file_error(image_factory):
    small = image_factory("small.png", size=20)
    big = image_factory("big.png", size=60, seed=1)
    (batch,) = _collect([small, big, small], _only_small, batch_size=8)
    assert batch.ok == [0, 2]
    assert batch.errors[1] == f"preprocess failed: {big}: ValueError: width 60 over 50"
    assert batch.shas[1] == sha256_bytes(big.read_bytes())
    assert batch.pixels.shape == (2, 3, 16, 16)


def test_odd_output_shapes_are_rejected_not_stacked(image_factory):
    a = image_factory("a.png", size=20)
    b = image_factory("b.png", size=24, seed=1)
    as_is = lambda img: pil_to_tensor(img).float()  # noqa: E731 - output size follows the input
    (batch,) = _collect([a, a, b], as_is, batch_size=8)
    assert batch.ok == [0, 1] and batch.pixels.shape == (2, 3, 20, 20)
    assert batch.errors[2].startswith(f"preprocess failed: {b}: output shape (3, 24, 24)")


def test_empty_input_and_bad_arguments(transform):
    assert _collect([], transform) == []
    with pytest.raises(ValueError, match="batch_size"):
        _collect(["x.png"], transform, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        _collect(["x.png"], transform, num_workers=-1)
