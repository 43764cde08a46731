"""Bulk classification through the bad-input corpus: never a crash, never a wrong row.

Every kind of :mod:`tests.badcorpus` is mixed in among good images and classified with
decoding worker processes. Each good image must get the prediction a run on the good
images alone gives; each bad file either decodes (and gets the prediction its own pixels
give) or carries its reason; every row carries its own file's sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from heads.classify.engine import classify
from tests.badcorpus import KINDS, make_bad_corpus, make_good_images, vanish
from tests.heads.classify.driver import make_bank
from trunk.decode import load_image
from trunk.images import resolve_inputs
from trunk.preprocess import decode_side, eval_transform


def _rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def _run(trunk, bank, paths, out, workers=1):
    return classify(trunk, bank, paths, out, release={"version": "1", "trunk_id": trunk.trunk_id}, batch_size=5,
                    num_workers=workers, rows_per_shard=16, progress=False)


@pytest.fixture
def corpus(tmp_path):
    good = [str(p) for p in make_good_images(tmp_path / "data" / "good", 20, size=48, seed=3)]
    cases = make_bad_corpus(tmp_path / "data" / "odd", keep_vanishing=True)
    return good, cases


def test_every_kind_is_classified_or_has_its_reason(tmp_path, tiny_trunk, corpus):
    good, cases = corpus
    assert {c.kind for c in cases} == set(KINDS) and len(KINDS) == 13
    bank = make_bank(tiny_trunk)
    # Interleave: bad files land in every batch and shard, between good ones.
    mixed = []
    for i, case in enumerate(cases):
        mixed += good[i * len(good) // len(cases):(i + 1) * len(good) // len(cases)] + [str(case.path)]
    assert sorted(mixed) == sorted(good + [str(c.path) for c in cases])
    for case in cases:
        if case.kind == "vanished":
            vanish(case)  # listed (it is in `mixed`), gone before the job reads it

    summary = _run(tiny_trunk, bank, mixed, tmp_path / "mixed")
    _run(tiny_trunk, bank, good, tmp_path / "clean")
    clean = _rows(tmp_path / "clean")
    rows = _rows(tmp_path / "mixed")
    assert list(rows) == mixed

    heads = sorted(bank.names)
    for path in good:
        assert rows[path]["error"] is None
        for h in heads:
            assert rows[path][f"{h}_label"] == clean[path][f"{h}_label"], (path, h)
            assert rows[path][f"{h}_score"] == pytest.approx(clean[path][f"{h}_score"], abs=1e-5)

    transform = eval_transform(tiny_trunk.data_config)
    for case in cases:
        row = rows[str(case.path)]
        if case.expect == "ok":
            assert row["error"] is None, (case.kind, row["error"])
            # Its own pixels' prediction: decoded alone, forwarded alone.
            image, sha = load_image(case.path, draft_side=decode_side(tiny_trunk.data_config))
            assert case.matches(image), case.kind
            assert row["sha256"] == sha
            with torch.inference_mode():
                alone = bank.predict(tiny_trunk(transform(image)[None], bank.taps))
            for h in heads:
                assert row[f"{h}_label"] == alone[h][0][0], (case.kind, h)
                assert row[f"{h}_score"] == pytest.approx(alone[h][1][0].item(), abs=1e-5)
        else:
            assert row["error"] is not None and row["error"].startswith(case.expect + ": "), (case.kind, row["error"])
            assert all(row[f"{h}_label"] is None and row[f"{h}_score"] is None for h in heads)
            if case.path.is_file():
                assert row["sha256"] == hashlib.sha256(case.path.read_bytes()).hexdigest()
            else:
                assert row["sha256"] is None

    n_bad = sum(c.expect != "ok" for c in cases)
    assert summary["counts"]["errors"] == n_bad
    assert sum(summary["errors_by_reason"].values()) == n_bad
    assert set(summary["errors_by_reason"]) == {c.expect for c in cases if c.expect != "ok"}


def test_folder_input_lists_only_files(tmp_path, tiny_trunk, corpus):
    _, cases = corpus
    listed = resolve_inputs(cases[0].path.parent)
    folder_case = next(c for c in cases if c.kind == "folder")
    assert str(folder_case.path) not in listed  # a folder named *.jpg is not an image file
    for case in cases:
        if case.kind == "vanished":
            vanish(case)
    summary = _run(tiny_trunk, make_bank(tiny_trunk), listed, tmp_path / "out", workers=0)
    assert summary["counts"]["images"] == len(listed)
    assert summary["errors_by_reason"]["file not found"] == 1
