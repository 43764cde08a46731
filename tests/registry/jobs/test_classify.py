"""classify labels=: every production head scored on a labelled set, from the job's own output, logged to MLflow."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import tools.classify as tools_classify
from heads.checks.heldout import LabelsError
from heads.classify.output import shard_provenance
from registry.jobs.classify import classify_job, heldout_lines
from registry.store.heads import register_head
from registry.store.releases import bootstrap_release, promote_head
from registry.store.trunks import register_trunk
from tools.common import CONF_DIR
from trunk.preprocess import eval_transform
from trunk.seen import SeenImages, content_sha

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")
RUN = {"batch_size": 4, "num_workers": 0, "device": "cpu", "progress": False}


@pytest.fixture
def production(client, trunk_a, make_result, tmp_path):
    """Production release: trunk_a (which trained on image 0) with heads colour and shape; 8 images, 1 broken."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    tv = register_trunk(client, trunk_a, trained_on=SeenImages([content_sha(folder / "0.png")]))
    bootstrap_release(client, tv)
    register_head(client, varied(trunk_a, make_result(trunk_a, "colour", classes=COLOURS), folder), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape", classes=SHAPES, seed=1), trunk_version=tv)
    promote_head(client, "colour", 1)
    release = promote_head(client, "shape", 1)
    return folder, release


def varied(trunk, result, folder):
    """Class k's weights: image k's pooled features (centred), so predictions differ between images."""
    transform = eval_transform(trunk.data_config)
    x = torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(8)])
    with torch.no_grad():
        features = trunk(x, ["pooled"])["pooled"]
        mean = features.mean(0)
        weight = (features[:3] - mean) / (features[:3] - mean).norm(dim=1, keepdim=True)
        result.module.fc.weight.copy_(weight)
        result.module.fc.bias.copy_(-(weight @ mean))  # logits of the centred features
    return result


def predictions(out) -> dict[str, dict[str, str]]:
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    return {p: {"colour": c, "shape": s} for p, c, s in zip(table["path"], table["colour_label"], table["shape_label"])}


def other(label: str, classes) -> str:
    return classes[(classes.index(label) + 1) % len(classes)]


def expected_f1(pairs, classes) -> float:
    """Macro-F1 over the classes present in labels or predictions, counted here by hand."""
    f1 = []
    for c in classes:
        tp = sum(t == p == c for t, p in pairs)
        support, predicted = sum(t == c for t, _ in pairs), sum(p == c for _, p in pairs)
        if support + predicted:
            f1.append(2 * tp / (support + predicted))
    return sum(f1) / len(f1)


def test_labels_score_every_labelled_head_on_the_output_and_log_heldout_runs(client, workspace, production, tmp_path,
                                                                            capsys):
    folder, release = production
    out = tmp_path / "out"
    first = classify_job(client, folder, out, **RUN)
    pred = predictions(out)
    assert len({p["colour"] for p in pred.values() if p["colour"]}) > 1  # a join by position would be caught
    # Each shard names what the registry resolved: release, trunk, head versions and classes.
    provenance = shard_provenance(out / "part-00000.parquet")
    assert provenance["release"] == release.as_dict() and provenance["job"]["fingerprint"] == first["fingerprint"]
    assert provenance["trunk"] == {"version": release.trunk_version, "trunk_id": release.trunk_id}
    assert provenance["heads"] == {"colour": {"version": 1, "classes": list(COLOURS)},
                                   "shape": {"version": 1, "classes": list(SHAPES)}}

    # colour: images 0-3 labelled as predicted, 4-5 wrongly, 6 unlabelled for colour; broken labelled (not scored).
    # Rows in another order than the output, relative to the labels file's folder; one row names no output image.
    truth = {i: pred[str(folder / f"{i}.png")]["colour"] for i in range(4)}
    truth |= {i: other(pred[str(folder / f"{i}.png")]["colour"], COLOURS) for i in (4, 5)}
    cut = {0: "indoor", 1: "indoor", 2: "indoor", 4: "indoor", 3: "outdoor", 5: "outdoor", 6: "outdoor"}
    lines = ["path,colour,slice"]
    lines += [f"../images/{i}.png,{truth[i]},{cut[i]}" for i in (5, 3, 1, 0, 4, 2)]
    lines += ["../images/6.png,,outdoor", "../images/broken.png,red,indoor", "../images/absent.png,red,"]
    labels = tmp_path / "labels" / "heldout.csv"
    labels.parent.mkdir()
    labels.write_text("\n".join(lines) + "\n")

    success = classify_job(client, folder, out, labels=labels, **RUN)
    report = success["heldout"]
    # Finished before: the job writes nothing; scoring reads its output.
    assert {k: v for k, v in success.items() if k != "heldout"} == first
    assert (report["rows"], report["unmatched"], report["skipped"]) == (8, 1, ["shape"])  # row 6: no label
    colour = report["heads"]["colour"]
    pairs = [(truth[i], pred[str(folder / f"{i}.png")]["colour"]) for i in range(6)]
    assert (colour["images"], colour["errors"], colour["version"]) == (6, 1, 1)
    assert colour["accuracy"] == pytest.approx(4 / 6)
    assert colour["macro_f1"] == pytest.approx(expected_f1(pairs, COLOURS))
    counts = Counter(pairs)
    assert colour["confusion"] == [[counts[(t, p)] for p in COLOURS] for t in COLOURS]
    assert colour["slice_accuracy"] == {"indoor": pytest.approx(3 / 4), "outdoor": pytest.approx(1 / 2)}
    assert colour["slice_sizes"] == {"indoor": 4, "outdoor": 2}
    # The trunk trained on image 0: counted, and the accuracy on the other five given beside.
    assert colour["metrics"]["heldout_seen_by_trunk"] == 1.0
    assert colour["metrics"]["heldout_accuracy_unseen"] == pytest.approx(3 / 5)

    run = client.get_run(colour["run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("heldout").experiment_id
    assert run.info.run_name == "colour" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert (m["heldout_accuracy"], m["heldout_images"], m["heldout_errors"]) == (pytest.approx(4 / 6), 6.0, 1.0)
    assert m["heldout_macro_f1"] == pytest.approx(expected_f1(pairs, COLOURS))
    assert m["heldout_slice_accuracy.indoor"] == pytest.approx(3 / 4) and m["heldout_slice_size.outdoor"] == 2.0
    tags = run.data.tags
    assert (tags["head"], tags["head_version"], tags["release_version"], tags["trunk_version"]) == (
        "colour", "1", str(release.version), str(release.trunk_version))
    assert tags["labels_sha256"] == content_sha(labels) and tags["fingerprint"] == success["fingerprint"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"heldout.json", "heldout_confusion.png"}

    assert heldout_lines(report)[1] == (f"  colour v1: accuracy 0.667, macro-F1 {expected_f1(pairs, COLOURS):.3f} on 6 "
                                        f"images; 1 failed to decode, not scored")

    # The tool, on the same output and labels: the figures printed after classify's summary, nothing new logged.
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="classify", overrides=[
            f"workspace={workspace}", f"input={folder}", f"output={out}", f"labels={labels}", "batch_size=4",
            "num_workers=0", "device=cpu", "progress=false"])
    tools_classify.main(cfg)
    printed = capsys.readouterr().out
    assert f"held-out scoring against {labels}: 8 labelled images, 1 not in the output (not scored)" in printed
    assert "colour v1: accuracy 0.667" in printed and "slices: indoor 0.750 (4), outdoor 0.500 (2)" in printed
    assert "1 of them (17%) the trunk trained on; accuracy on the other 5: 0.600" in printed
    assert "not scored (no column in the labels file): shape" in printed
    assert f"logged to MLflow experiment 'heldout', one run per head: colour {colour['run_id']}" in printed
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_label_that_is_not_a_class_is_one_line_before_any_image_is_classified(client, production, tmp_path):
    folder, _ = production
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,colour,shape\n{folder / '0.png'},red,circle\n{folder / '1.png'},blue,oval\n")
    with pytest.raises(LabelsError) as err:
        classify_job(client, folder, tmp_path / "out", labels=labels, **RUN)
    assert str(err.value) == (f"{labels}: row 2: column 'shape': 'oval' is not one of the head's classes "
                              f"(circle, square)")
    assert not (tmp_path / "out").exists()


def test_reduced_head_weights_are_part_of_the_job_and_keep_the_labels(client, production, tmp_path):
    folder, _ = production
    fp32 = classify_job(client, folder, tmp_path / "fp32", monitor=False, **RUN)
    bf16 = classify_job(client, folder, tmp_path / "bf16", monitor=False, head_weights="bfloat16", **RUN)
    assert "head_weights" not in fp32["settings"] and bf16["settings"]["head_weights"] == "bfloat16"
    assert bf16["fingerprint"] != fp32["fingerprint"]  # different scores: never resumed into each other
    assert shard_provenance(sorted((tmp_path / "bf16").glob("part-*.parquet"))[0])["job"]["settings"] == \
        bf16["settings"]
    a, b = (pq.read_table(sorted((tmp_path / d).glob("part-*.parquet"))).to_pydict() for d in ("fp32", "bf16"))
    assert a["path"] == b["path"] and a["colour_label"] == b["colour_label"] and a["shape_label"] == b["shape_label"]
    ok = [i for i, e in enumerate(a["error"]) if e is None]
    assert max(abs(a["colour_score"][i] - b["colour_score"][i]) for i in ok) < 0.02
    # float32 named explicitly is the default job, not a new one
    again = classify_job(client, folder, tmp_path / "fp32", monitor=False, head_weights="float32", **RUN)
    assert again["fingerprint"] == fp32["fingerprint"]
    # int8 weights with per-row scales: their own job too, scores within int8's rounding.
    int8 = classify_job(client, folder, tmp_path / "int8", monitor=False, head_weights="int8", **RUN)
    assert int8["settings"]["head_weights"] == "int8"
    assert int8["fingerprint"] not in (fp32["fingerprint"], bf16["fingerprint"])
    c = pq.read_table(sorted((tmp_path / "int8").glob("part-*.parquet"))).to_pydict()
    assert c["path"] == a["path"] and c["colour_label"] == a["colour_label"] and c["shape_label"] == a["shape_label"]
    assert max(abs(a[f"{h}_score"][i] - c[f"{h}_score"][i]) for h in ("colour", "shape") for i in ok) < 0.01
