"""Writing platform pyfunc model folders: a self-contained release, or one head that fetches its trunk.

Both are saved with ``mlflow.pyfunc.save_model`` from code (:mod:`registry.serving.model`),
with an explicit signature (optional ``path`` / ``image`` inputs; bulk classification's
output columns), a small input example, explicit pip requirements (so MLflow neither
infers them by loading the model nor pickles anything) and the model settings
``batch_size``, ``device``, ``draft``, ``tracking_uri`` as its ``model_config`` (each may be
overridden at load, or by ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` for ``mlflow models serve``).

A release folder (:func:`build_release_model`) holds, as the artifact ``bundle``, the
manifest ``serving.json``, the trunk's files under ``trunk/`` and every head in one pack,
``heads.safetensors`` + ``heads.json`` (:mod:`registry.serving.pack`: each head's two files
byte for byte as its version registered them), checked against the hashes the registry
recorded. Release folders written before packs hold each head under ``heads/<name>/``;
they still load. A head folder (:func:`write_head_model`) gets the model
files next to its ``head.json`` and ``head.safetensors``, which it serves in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from heads.store import DIGEST_KEYS, SPEC_FILE, WEIGHTS_FILE, artifact_digests, load_head
from registry.serving.pack import PACK_FILES, PackedHead, PackError, PackSource, read_pack, write_pack
from registry.serving.runtime import (
    DEFAULT_CONFIG,
    FORMAT_VERSION,
    IMAGE_COLUMN,
    MANIFEST_FILE,
    PACK_FORMAT_VERSION,
    PATH_COLUMN,
    ServingError,
    read_manifest,
    sha256_file,
)
from registry.store.trunks import get_trunk_version
from trunk.files import write_json_atomic
from trunk.model import SPEC_FILE as TRUNK_SPEC_FILE
from trunk.model import WEIGHTS_FILE as TRUNK_WEIGHTS_FILE

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("model.py")
BUNDLE = "bundle"
HEAD_ARTIFACT = "head"
# Distributions the model's code imports; the platform itself must be installed where it is served.
REQUIREMENTS = ("vision-trunk-platform", "mlflow", "torch", "timm", "safetensors", "pillow", "numpy", "pandas",
                "fsspec")
# How many bytes of verified head files one client keeps in memory for the next release it builds.
_FILE_CACHE_BYTES = 256 << 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib")
# Every file MLflow writes for a model, which a head folder must not hold already.
MODEL_FILES = ("MLmodel", "model.py", "artifacts", "conda.yaml", "python_env.yaml", "requirements.txt",
               "input_example.json", "serving_input_example.json")


def signature(head_names: Sequence[str]) -> ModelSignature:
    """Inputs ``path`` (string) and ``image`` (binary), both optional; outputs the bulk columns."""
    inputs = Schema([ColSpec("string", PATH_COLUMN, required=False), ColSpec("binary", IMAGE_COLUMN, required=False)])
    outputs = [ColSpec("string", "path", required=False), ColSpec("string", "sha256", required=False),
               ColSpec("string", "error", required=False)]
    for name in sorted(head_names):
        outputs += [ColSpec("string", f"{name}_label", required=False),
                    ColSpec("float", f"{name}_score", required=False)]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the versions installed here (unpinned when one is not installed)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def input_example():
    import pandas as pd

    return pd.DataFrame({PATH_COLUMN: ["images/0001.jpg", "s3://bucket/images/0002.png"]})


def check_no_pickle(folder: str | Path) -> None:
    """Raise :class:`ServingError` if a model folder holds a pickle or is a cloudpickled model."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ServingError(f"{path}: a pickle-format file in a platform model folder")
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    if "python_model" in flavor or "model_code_path" not in flavor:
        raise ServingError(f"{folder / 'MLmodel'}: not a models-from-code model (it would unpickle its python_model)")


def save_platform_model(path: str | Path, bundle: str | Path, head_names: Sequence[str]) -> Path:
    """``mlflow.pyfunc.save_model`` of :mod:`registry.serving.model` with ``bundle`` (a folder
    holding ``serving.json``) as its one artifact; ``path`` must not exist or be empty.

    Returns:
        The model folder, checked to hold no pickle.
    """
    path = Path(path)
    mlflow.pyfunc.save_model(
        str(path), python_model=str(MODEL_CODE), artifacts={BUNDLE: str(bundle)},
        signature=signature(head_names), input_example=input_example(), pip_requirements=pip_requirements(),
        model_config={**DEFAULT_CONFIG, "tracking_uri": ""})
    check_no_pickle(path)
    return path


def _bundle_dir(model_folder: Path) -> Path:
    flavor = yaml.safe_load((model_folder / "MLmodel").read_text())["flavors"]["python_function"]
    return model_folder / flavor["artifacts"][BUNDLE]["path"]


def _fetch(client: MlflowClient, source: str, file_name: str, dst: Path) -> None:
    """Download the file ``file_name`` of a version's ``source`` folder to ``dst`` (one request)."""
    from registry.store.tracking import ArtifactError, fetch_artifact

    try:
        fetch_artifact(client, f"{source.rstrip('/')}/{file_name}", dst)
    except ArtifactError as e:
        raise ServingError(f"cannot download {file_name}: {e}") from None


def _stage_trunk(client: MlflowClient, version: int, trunk_id: str, dst: Path) -> dict[str, Any]:
    source = get_trunk_version(client, version).source
    files = {}
    for name in (TRUNK_SPEC_FILE, TRUNK_WEIGHTS_FILE):
        _fetch(client, source, name, dst / name)
        files[name] = sha256_file(dst / name)
    spec_id = json.loads((dst / TRUNK_SPEC_FILE).read_text()).get("trunk_id")
    if spec_id != trunk_id:
        raise ServingError(f"trunk v{version}: its {TRUNK_SPEC_FILE} says trunk_id {spec_id} but the version is "
                           f"tagged {trunk_id}; the stored artifacts were altered")
    return {"version": int(version), "trunk_id": trunk_id, "dir": "trunk", "files": files}


def _from_registry(name: str, mv: Any, weights: bytes, spec: bytes) -> PackedHead:
    return PackedHead(name=name, version=int(mv.version), tap=mv.tags.get("tap"), trunk_id=mv.tags.get("trunk_id"),
                      weights=weights, spec=spec)


def _recorded(mv: Any) -> dict[str, str] | None:
    """A head version's content hashes as registered, or None when it was registered without them."""
    recorded = {k: mv.tags.get(k) for k in DIGEST_KEYS}
    return recorded if all(recorded.values()) else None


def _download_head(client: MlflowClient, name: str, mv: Any, dst: Path) -> PackedHead:
    """One head version's two files (two requests), checked against its recorded hashes."""
    label = f"head.{name} v{int(mv.version)}"
    for file_name in (SPEC_FILE, WEIGHTS_FILE):
        _fetch(client, mv.source, file_name, dst / file_name)
    recorded = _recorded(mv)
    if recorded is None:
        log.warning("%s: registered without content hashes; packaging its files as they are now", label)
    # The same check load_head_version makes: what is packaged is what was registered.
    load_head(dst, expected=recorded or artifact_digests(dst), label=label)
    return _from_registry(name, mv, (dst / WEIGHTS_FILE).read_bytes(), (dst / SPEC_FILE).read_bytes())


def fetch_pack(client: MlflowClient, source: PackSource, dst: str | Path) -> dict[str, PackedHead]:
    """Download a release's pack (two requests) into ``dst`` and read it, checked against ``source.files``.

    Raises:
        ServingError: a file cannot be downloaded, or the pack does not match its sha256
            or cannot be read (one line naming the release and the file).
    """
    dst = Path(dst)
    for file_name in PACK_FILES:
        _fetch(client, source.uri, file_name, dst / file_name)
    try:
        return read_pack(dst, expected=source.files, recorded_in=source.recorded_in, label=f"{source.label} pack")
    except PackError as e:
        raise ServingError(str(e)) from None


def _gather_heads(client: MlflowClient, manifest: Mapping[str, Any], base: PackSource | None,
                  tmp: Path) -> dict[str, PackedHead]:
    """Every head of ``manifest`` as registered, each checked against its version's recorded hashes.

    A head comes from this client's memory of files it already checked (keyed by their
    hashes: never stale), else from ``base``'s pack when that holds the same version (one
    download of the pack for all of them), else from its version's own artifacts (two
    downloads). A pack head whose bytes do not hash to its version's tags is not used: it
    is downloaded instead, and that copy must match.
    """
    from registry.store.heads import head_versions  # here: registry.store.heads imports this module
    from registry.store.tracking import client_cache

    wanted = {name: int(h["version"]) for name, h in manifest["heads"].items()}
    # Every head's version record in one search per 100 heads, not one call per head; those the
    # caller just checked (registry.store.releases) are not asked again: only their source and
    # content hashes are used, which never change.
    versions = head_versions(client, wanted, fresh=False)
    cache = client_cache(client, "verified_head_files")
    out: dict[str, PackedHead] = {}

    def take(name: str, weights: bytes, spec: bytes) -> bool:
        packed = _from_registry(name, versions[name], weights, spec)
        if packed.digests() != _recorded(versions[name]):
            return False
        out[name] = packed
        return True

    for name in sorted(wanted):
        key = tuple((_recorded(versions[name]) or {}).values()) or None
        if key in cache:
            take(name, *cache[key])
    todo = [n for n in sorted(wanted) if n not in out and _recorded(versions[n]) is not None]
    if base is not None and any(base.heads.get(n) == wanted[n] for n in todo):
        try:
            packed = fetch_pack(client, base, tmp / "base")
        except ServingError as e:
            log.warning("the new release's heads are downloaded one by one: %s", e)
            packed = {}
        for name in todo:
            p = packed.get(name)
            if p is not None and p.version == wanted[name] and not take(name, p.weights, p.spec):
                log.warning("head.%s v%s in %s pack does not match its recorded hashes; downloading it",
                            name, wanted[name], base.label)
    for name in sorted(wanted):
        if name not in out:
            out[name] = _download_head(client, name, versions[name], tmp / "heads" / name)
    held = sum(len(w) + len(s) for w, s in cache.values())
    for name, p in sorted(out.items()):
        key = tuple((_recorded(versions[name]) or {}).values()) or None
        if key is not None and key not in cache and held + len(p.weights) + len(p.spec) < _FILE_CACHE_BYTES:
            cache[key] = (p.weights, p.spec)
            held += len(p.weights) + len(p.spec)
    return out


def build_release_model(client: MlflowClient, manifest: Mapping[str, Any], path: str | Path, *,
                        base: PackSource | None = None) -> Path:
    """Write a self-contained release model folder for a release manifest.

    The heads go into one pack (:mod:`registry.serving.pack`), each head's files as its
    version registered them, checked against the hashes recorded then. Heads ``base`` (an
    earlier release's pack, e.g. the production a promotion builds on) holds in the same
    version are taken from it: a release that changes one head downloads the base's pack
    and that head's files, whatever the head count.

    Args:
        client: the registry holding the manifest's trunk and head versions.
        manifest: a release manifest (``release.json``'s content: ``trunk`` ``{version,
            trunk_id}``, ``heads`` ``{name: {version, ...}}``, ``note``).
        path: the folder to write (must not exist, or be empty).
        base: an earlier release's pack to take unchanged heads from (None: every head is
            downloaded from its version, unless this client checked its files already).

    Returns:
        ``path``, loadable with ``mlflow.pyfunc.load_model``; :func:`release_pack` says
        where its pack is.

    Raises:
        ServingError: the release has no heads, or a trunk file disagrees with its tag.
        heads.store.HeadArtifactError: a head's files do not match the hashes recorded at
            its registration.
    """
    if not manifest["heads"]:
        raise ServingError("a release with no heads classifies nothing; it has no pyfunc model")
    with tempfile.TemporaryDirectory(prefix="release-model-") as tmp:
        bundle = Path(tmp) / BUNDLE
        bundle.mkdir()
        trunk = _stage_trunk(client, int(manifest["trunk"]["version"]), manifest["trunk"]["trunk_id"],
                             bundle / "trunk")
        heads = _gather_heads(client, manifest, base, Path(tmp) / "staging")
        pack = write_pack(bundle, heads)
        entries = {name: {"version": h.version, "tap": h.tap, "trunk_id": h.trunk_id, **h.digests()}
                   for name, h in sorted(heads.items())}
        serving = {"format": PACK_FORMAT_VERSION, "kind": "release", "note": manifest.get("note", ""),
                   "trunk": trunk, "pack": pack, "heads": entries}
        write_json_atomic(bundle / MANIFEST_FILE, serving, sort_keys=True)
        return save_platform_model(path, bundle, list(heads))


def release_pack(model_folder: str | Path) -> dict[str, Any]:
    """Where a release model folder keeps its heads pack: ``{"dir": <folder relative to the
    model folder>, "files": {file name: sha256}}``, as its ``serving.json`` records them.

    Raises:
        ServingError: the folder's model has no pack (a release model written before packs).
    """
    model_folder = Path(model_folder)
    bundle = _bundle_dir(model_folder)
    serving = read_manifest(bundle / MANIFEST_FILE)
    if "pack" not in serving:
        raise ServingError(f"{bundle / MANIFEST_FILE}: this release model has no heads pack")
    return {"dir": bundle.relative_to(model_folder).as_posix(), "files": dict(serving["pack"])}


def write_head_model(folder: str | Path, *, trunk_version: int) -> Path:
    """Make a head's artifact folder (``head.json`` + ``head.safetensors``) an MLflow pyfunc model.

    The model serves the head on ``trunk`` v<trunk_version>, fetched from the registry at
    load (``models:/trunk/<version>``, through the caller's tracking URI) and checked to
    have the head's ``trunk_id``. The head's files stay where they are; the manifest
    records their sha256 (the same ``weights_sha256`` / ``spec_sha256`` the registry tags
    the version with), so a file changed after this call is refused at load.

    Args:
        folder: the head's folder, as :func:`heads.store.save_head` wrote it.
        trunk_version: the ``trunk`` version the head was trained on.

    Returns:
        ``folder``.

    Raises:
        ServingError: ``folder`` already holds model files.
        heads.store.HeadArtifactError: the head's files do not load.
    """
    folder = Path(folder)
    taken = [n for n in MODEL_FILES if (folder / n).exists()]
    if taken:
        raise ServingError(f"{folder}: already holds {', '.join(taken)}; write the model into a fresh head folder")
    digests = artifact_digests(folder)
    head = load_head(folder, expected=digests)
    with tempfile.TemporaryDirectory(prefix="head-model-") as tmp:
        bundle = Path(tmp) / BUNDLE
        bundle.mkdir()
        entry = {"version": None, "tap": head.tap, "trunk_id": head.meta["trunk_id"], "dir": ".", **digests}
        serving = {"format": FORMAT_VERSION, "kind": "head", "trunk": {"version": int(trunk_version),
                                                                       "trunk_id": head.meta["trunk_id"]},
                   "heads": {head.name: entry}}
        write_json_atomic(bundle / MANIFEST_FILE, serving, sort_keys=True)
        model = save_platform_model(Path(tmp) / "model", bundle, [head.name])
        # The head's files are the model root: point the manifest at it from where MLflow put the bundle.
        saved = _bundle_dir(model)
        entry["dir"] = Path(os.path.relpath(model, saved)).as_posix()
        write_json_atomic(saved / MANIFEST_FILE, serving, sort_keys=True)
        for item in sorted(model.iterdir()):
            shutil.move(str(item), str(folder / item.name))
    return folder
