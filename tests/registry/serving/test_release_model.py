"""Release and head versions as MLflow pyfunc models: the same rows as bulk classification, nothing unpickled."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from heads.store import DIGEST_KEYS, HeadArtifactError, load_head
from registry.jobs.classify import classify_job
from registry.serving import ServingError, check_no_pickle, load_head_model, load_release, write_head_model
from registry.serving.pack import PACK_FILES, read_pack, write_pack
from registry.store.heads import get_head_version, register_head
from registry.store.releases import (
    MODEL_ARTIFACT,
    RELEASE_MODEL,
    ReleaseError,
    bootstrap_release,
    create_release,
    production_version,
    promote_head,
)
from registry.store.trunks import register_trunk
from tests.mlflow_server import free_port, stop_group, wait_healthy
from trunk.files import write_json_atomic
from trunk.preprocess import eval_transform

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")
BATCH = 4
RUN = {"batch_size": BATCH, "num_workers": 0, "device": "cpu", "progress": False}
CONFIG = {"batch_size": BATCH, "device": "cpu"}


def varied(trunk, result, images):
    """Class k's weights: image k's pooled features (centred), so predictions differ between images."""
    transform = eval_transform(trunk.data_config)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images[:3]])
    with torch.no_grad():
        features = trunk(x, ["pooled"])["pooled"]
        mean = features.mean(0)
        weight = (features - mean) / (features - mean).norm(dim=1, keepdim=True)
        result.module.fc.weight.copy_(weight)
        result.module.fc.bias.copy_(-(weight @ mean))
    return result


@pytest.fixture
def production(client, trunk_a, make_result, tmp_path, one_thread):
    """Production: trunk_a with heads colour and shape; 6 images (PNG and a large JPEG) and one corrupt file."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    paths.append(folder / "big.jpg")  # decoded in draft mode, as bulk does
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(paths[-1], quality=90)
    paths.append(folder / "broken.png")
    paths[-1].write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    tv = register_trunk(client, trunk_a)
    bootstrap_release(client, tv)
    register_head(client, varied(trunk_a, make_result(trunk_a, "colour", classes=COLOURS), paths), trunk_version=tv)
    register_head(client, make_result(trunk_a, "shape", classes=SHAPES, seed=1), trunk_version=tv)
    promote_head(client, "colour", 1)
    release = promote_head(client, "shape", 1)
    return paths, release, tv


def bulk_rows(client, paths, tmp_path) -> pd.DataFrame:
    """What tools.classify writes for these files: the real job, read back from its Parquet."""
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / "bulk"
    classify_job(client, manifest, out, monitor=False, **RUN)
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pandas()


def cells(column: pd.Series) -> list:
    """Plain values, nulls as None (Parquet strings read back as pandas strings with NaN)."""
    return [None if pd.isna(x) else x for x in column.tolist()]


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame, *, exact: bool = True) -> None:
    assert list(got.columns) == list(want.columns)
    for column in want.columns:
        if column.endswith("_score"):
            assert got[column].dtype == np.float32
            g, w = got[column].to_numpy(), want[column].to_numpy()
            assert np.array_equal(np.isnan(g), np.isnan(w)), column
            if exact:
                assert np.array_equal(g[~np.isnan(g)], w[~np.isnan(w)]), column
            else:
                np.testing.assert_allclose(g[~np.isnan(g)], w[~np.isnan(w)], rtol=0, atol=1e-6, err_msg=column)
        else:
            assert cells(got[column]) == cells(want[column]), column


def test_release_model_predicts_exactly_what_bulk_classification_writes(client, workspace, production, tmp_path):
    paths, release, _ = production
    want = bulk_rows(client, paths, tmp_path)
    assert want["error"].notna().sum() == 1 and want["error"].iloc[-1].startswith("truncated image: ")
    assert want["colour_label"].iloc[:3].tolist() == list(COLOURS)  # the heads really tell images apart

    model = mlflow.pyfunc.load_model(f"models:/{RELEASE_MODEL}@production", model_config=CONFIG)
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    # Same batches as the job (batch_size 4 both): the same floats, bit for bit.
    assert_same_rows(by_path, want)

    images = [p.read_bytes() for p in paths]
    named = model.predict(pd.DataFrame({"path": [str(p) for p in paths], "image": images}))
    assert_same_rows(named, want)  # bytes are classified; the path names the row, in its error too
    anonymous = model.predict(pd.DataFrame({"image": images}))
    assert anonymous["path"].isna().all()
    assert anonymous["error"].iloc[-1].startswith(f"truncated image: image[{len(paths) - 1}]: ")
    assert_same_rows(anonymous.drop(columns=["path", "error"]), want.drop(columns=["path", "error"]))
    # The in-memory file system holds other calls' bytes while they run: a caller's path never reads it.
    with pytest.raises(ServingError, match="memory:// paths are not read"):
        model.predict(pd.DataFrame({"path": ["memory://vtp-serving/0123/0"]}))

    # The in-process API, default batching (64: one batch here, the job cut two): equal to 1e-6.
    api = load_release("production", model_config={"device": "cpu"})
    assert api.version == release.version
    # A workspace folder names its store, as workspace= does on every tool, whatever MLflow's global URIs say.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        assert load_release(workspace=workspace, model_config={"device": "cpu"}).version == release.version
        assert load_head_model("colour", "production", workspace=workspace).predict(paths[:1])["colour_label"][0] \
            == want["colour_label"][0]
    finally:
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_registry_uri(client.tracking_uri)
    assert_same_rows(api.predict(paths), want, exact=False)
    assert_same_rows(api.predict(images).drop(columns=["path", "error"]), want.drop(columns=["path", "error"]),
                     exact=False)


def test_release_model_folder_holds_no_pickle_and_refuses_a_tampered_file(client, production, tmp_path):
    _, release, _ = production
    mv = client.get_model_version(RELEASE_MODEL, str(release.version))
    assert mv.source.endswith(f"/{MODEL_ARTIFACT}")
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{RELEASE_MODEL}/{release.version}",
                                                      dst_path=str(tmp_path / "dl")))
    check_no_pickle(folder)
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))]
    # Every head is in one pack (heads.safetensors + heads.json), not a folder per head.
    assert {"MLmodel", "model.py", "serving.json", "trunk.safetensors", "heads.safetensors", "heads.json"} <= names
    assert "head.safetensors" not in names and "head.json" not in names
    assert "python_model" not in (folder / "MLmodel").read_text()

    weights = next(folder.rglob("heads.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ServingError, match=r"heads\.safetensors does not match the sha256 in serving\.json"):
        mlflow.pyfunc.load_model(str(folder))
    weights.write_bytes(bytes(blob[:-1]) + bytes([blob[-1] ^ 0xFF]))  # restored: it loads again
    mlflow.pyfunc.load_model(str(folder))

    # A pack rewritten together with serving.json's record of it: each head's own recorded hash refuses it.
    serving_path = weights.parent / "serving.json"
    serving = json.loads(serving_path.read_text())
    original = {f: (weights.parent / f).read_bytes() for f in PACK_FILES}
    heads = read_pack(weights.parent, expected=serving["pack"])
    assert sorted(heads) == ["colour", "shape"] and heads["colour"].version == 1
    assert heads["colour"].digests() == {k: client.get_model_version("head.colour", "1").tags[k] for k in DIGEST_KEYS}
    colour = heads["colour"]
    swapped = dataclasses.replace(colour, weights=colour.weights[:-1] + bytes([colour.weights[-1] ^ 0xFF]))
    write_json_atomic(serving_path, {**serving, "pack": write_pack(weights.parent, {**heads, "colour": swapped})},
                      sort_keys=True)
    with pytest.raises(HeadArtifactError) as err:
        mlflow.pyfunc.load_model(str(folder))
    message = str(err.value)
    assert "\n" not in message and "head.colour v1" in message and "head.safetensors" in message
    assert "tampered" in message

    for f, data in original.items():
        (weights.parent / f).write_bytes(data)
    write_json_atomic(serving_path, serving, sort_keys=True)
    mlflow.pyfunc.load_model(str(folder))  # restored: it loads again
    trunk_weights = next(folder.rglob("trunk/trunk.safetensors"))
    trunk_weights.write_bytes(trunk_weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ServingError, match=r"trunk\.safetensors does not match the sha256 in serving\.json"):
        mlflow.pyfunc.load_model(str(folder))


def test_head_version_model_predicts_the_release_columns_for_its_head(client, production, tmp_path):
    paths, _, tv = production
    mv = get_head_version(client, "colour", 1)
    # register_head made the version's head/ folder a model (write_head_model): models:/head.colour/1 loads.
    frame = pd.DataFrame({"path": [str(p) for p in paths]})
    head_rows = mlflow.pyfunc.load_model("models:/head.colour/1", model_config=CONFIG).predict(frame)
    assert list(head_rows.columns) == ["path", "sha256", "error", "colour_label", "colour_score"]
    release_rows = mlflow.pyfunc.load_model(f"models:/{RELEASE_MODEL}@production", model_config=CONFIG).predict(frame)
    # The release fuses both heads' linear layers into one matmul; alone, colour's is its own: 1e-6, not bits.
    assert_same_rows(head_rows, release_rows[list(head_rows.columns)], exact=False)

    folder = Path(client.download_artifacts(mv.run_id, "head", str(tmp_path / "head-dl")))
    # The model files beside them do not disturb the head's own hash check.
    assert (folder / "MLmodel").is_file()
    load_head(folder, expected={k: mv.tags[k] for k in DIGEST_KEYS})
    with pytest.raises(ServingError, match="already holds MLmodel"):
        write_head_model(folder, trunk_version=tv)
    (folder / "head.json").write_text((folder / "head.json").read_text().replace('"red"', '"RED"'))
    with pytest.raises(HeadArtifactError, match=r"head\.json does not match the sha256"):
        mlflow.pyfunc.load_model(str(folder))


def test_mlflow_models_serve_answers_with_the_bulk_rows(client, workspace, production, tmp_path):
    paths, _, _ = production
    want = bulk_rows(client, paths, tmp_path)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri,
           "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(CONFIG), "OMP_NUM_THREADS": "1",
           # mlflow execs `uvicorn` by name: this interpreter's scripts must be on PATH.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/release@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, path="/ping", what="mlflow models serve", timeout_s=90)
        body = {"dataframe_split": {"columns": ["path", "image"],
                                    "data": [[str(p), base64.b64encode(p.read_bytes()).decode()] for p in paths]}}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        log.seek(0)
        pytest.fail(f"/invocations answered {e.code}: {e.read().decode()[:500]}\n{log.read().decode()[-2000:]}")
    finally:
        stop_group(proc)
        log.close()
    got = pd.DataFrame(answer["predictions"])[list(want.columns)]
    for name in ("colour", "shape"):
        got[f"{name}_score"] = got[f"{name}_score"].astype("float32")
    got = got.where(got.notna(), None)
    assert_same_rows(got, want)


def test_a_head_whose_files_fail_their_hash_refuses_the_release_and_leaves_nothing(client, production):
    _, release, _ = production
    client.set_model_version_tag("head.colour", "1", "weights_sha256", "0" * 64)  # as if the file were swapped
    versions = {mv.version for mv in client.search_model_versions(f"name='{RELEASE_MODEL}'")}
    with pytest.raises(ReleaseError, match=r"pyfunc model cannot be built: head\.colour v1: head\.safetensors"):
        create_release(client, release.trunk_version, release.heads, expected_production=release.version,
                       note="again")
    assert production_version(client) == release.version
    assert {mv.version for mv in client.search_model_versions(f"name='{RELEASE_MODEL}'")} == versions


def test_a_release_model_written_before_packs_still_loads_and_predicts_the_same(client, production, tmp_path):
    paths, release, _ = production
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{RELEASE_MODEL}/{release.version}",
                                                      dst_path=str(tmp_path / "dl")))
    frame = pd.DataFrame({"path": [str(p) for p in paths]})
    want = mlflow.pyfunc.load_model(str(folder), model_config=CONFIG).predict(frame)
    # The layout releases had before packs: serving.json format 1, each head's two files under heads/<name>/.
    bundle = next(folder.rglob("serving.json")).parent
    serving = json.loads((bundle / "serving.json").read_text())
    heads = read_pack(bundle, expected=serving.pop("pack"))
    for name, head in heads.items():
        (bundle / "heads" / name).mkdir(parents=True)
        (bundle / "heads" / name / "head.safetensors").write_bytes(head.weights)
        (bundle / "heads" / name / "head.json").write_bytes(head.spec)
        serving["heads"][name]["dir"] = f"heads/{name}"
    for f in PACK_FILES:
        (bundle / f).unlink()
    write_json_atomic(bundle / "serving.json", {**serving, "format": 1}, sort_keys=True)
    assert_same_rows(mlflow.pyfunc.load_model(str(folder), model_config=CONFIG).predict(frame), want)
    (bundle / "heads" / "shape" / "head.json").write_text(heads["shape"].spec.decode().replace("circle", "CIRCLE"))
    with pytest.raises(HeadArtifactError, match=r"head\.shape v1 .*head\.json does not match the sha256"):
        mlflow.pyfunc.load_model(str(folder))
