"""What a served model does: rebuild its trunk and heads, verified, and classify a frame of inputs.

Both kinds of platform pyfunc model (:mod:`registry.serving.model`) run this code:

- a **release** model carries everything: its folder's ``serving.json`` names the trunk
  version, its ``trunk_id`` and the sha256 of its two files, and per head its version,
  tap, ``trunk_id`` and the two content hashes recorded when the head was registered;
  the trunk files are under ``trunk/`` beside it, and every head is in one pack,
  ``heads.safetensors`` + ``heads.json`` (:mod:`registry.serving.pack`), whose own sha256
  ``serving.json`` records too (format 2; a release written before packs, format 1, has
  each head's two files under ``heads/<name>/`` instead, and loads the same way);
- a **head** model (the ``head/`` folder of a ``head.<name>`` version) carries that one
  head; its trunk is fetched from the registry (``models:/trunk/<version>``, through the
  tracking URI the caller set) and must have the head's ``trunk_id``.

Every file is checked against the hash in the manifest before it is parsed, so a
tampered or corrupt file is refused with one line naming it; nothing is unpickled.

Prediction is bulk classification's own per-batch code: :func:`trunk.loader.decode_batch`
(read, hash, decode with Pillow's guards, the trunk's eval transform, JPEG draft mode as
bulk runs it), :class:`heads.predict.BatchPredictor` and :func:`heads.predict.batch_rows`.
So a row here equals the row ``tools.classify`` writes for the same file, batch for batch.
Encoded bytes (the ``image`` column) go through the very same reader: they are put under
a private ``memory://`` prefix for the duration of the call and read from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from heads.bank import HeadBank
from heads.predict import BatchPredictor, batch_rows, empty_columns
from heads.store import SPEC_SHA256, WEIGHTS_SHA256, LoadedHead, load_head
from registry.serving.pack import PACK_FILES, PACK_INDEX, PACK_WEIGHTS, PackError, read_pack
from trunk.device import resolve_device
from trunk.loader import decode_batch
from trunk.model import SPEC_FILE as TRUNK_SPEC_FILE
from trunk.model import WEIGHTS_FILE as TRUNK_WEIGHTS_FILE
from trunk.model import Trunk, TrunkError
from trunk.preprocess import decode_side, eval_transform

log = logging.getLogger(__name__)

MANIFEST_FILE = "serving.json"
# 1: a head model, or a release whose heads lie under heads/<name>/ (written before packs);
# 2: a release whose heads are one pack (registry.serving.pack).
FORMAT_VERSION = 1
PACK_FORMAT_VERSION = 2
FORMATS = (FORMAT_VERSION, PACK_FORMAT_VERSION)
KINDS = ("release", "head")
PATH_COLUMN = "path"
IMAGE_COLUMN = "image"
# Settings a caller may change at load (mlflow.pyfunc.load_model(..., model_config=...)).
DEFAULT_CONFIG = {"batch_size": 64, "device": "auto", "draft": True}
_MEMORY_ROOT = "memory://vtp-serving"


class ServingError(ValueError):
    """A platform model cannot be loaded or cannot read its input; the message is one line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The ``serving.json`` at ``path``, checked for the fields loading needs.

    Raises:
        ServingError: missing, not JSON, or a field is missing or of the wrong kind.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ServingError(f"{path}: no such file; this folder is not a platform model") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServingError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(manifest, dict):
        raise ServingError(f"{path}: must be a JSON object")
    if manifest.get("format") not in FORMATS:
        raise ServingError(f"{path}: field 'format' is {manifest.get('format')!r}, not one of "
                           f"{', '.join(map(str, FORMATS))} (written by a newer platform?)")
    if manifest.get("kind") not in KINDS:
        raise ServingError(f"{path}: field 'kind' is {manifest.get('kind')!r}, not one of {', '.join(KINDS)}")
    packed = manifest["format"] == PACK_FORMAT_VERSION
    if packed:
        pack = manifest.get("pack")
        if manifest["kind"] != "release" or not isinstance(pack, dict) \
                or not all(isinstance(pack.get(f), str) for f in PACK_FILES):
            raise ServingError(f"{path}: field 'pack' must hold the sha256 of {' and '.join(PACK_FILES)} "
                               f"(format {PACK_FORMAT_VERSION} is a release with a heads pack)")
    trunk = manifest.get("trunk")
    if not isinstance(trunk, dict) or not isinstance(trunk.get("trunk_id"), str) \
            or not isinstance(trunk.get("version"), int):
        raise ServingError(f"{path}: field 'trunk' must hold 'version' (int) and 'trunk_id' (string)")
    heads = manifest.get("heads")
    if not isinstance(heads, dict) or not heads:
        raise ServingError(f"{path}: field 'heads' must name at least one head")
    for name, entry in heads.items():
        for key in ((WEIGHTS_SHA256, SPEC_SHA256) if packed else ("dir", WEIGHTS_SHA256, SPEC_SHA256)):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
                raise ServingError(f"{path}: field 'heads.{name}.{key}' is missing")
    return manifest


def _check_file(path: Path, expected: str | None, label: str) -> None:
    if not path.is_file():
        raise ServingError(f"{label}: {path.name} is missing ({path})")
    if expected is None or sha256_file(path) != expected:
        raise ServingError(f"{label}: {path} does not match the sha256 in {MANIFEST_FILE} (tampered or corrupt)")


def _load_local_trunk(directory: Path, entry: Mapping[str, Any], label: str) -> Trunk:
    files = entry.get("files")
    if not isinstance(files, dict):
        raise ServingError(f"{label}: {MANIFEST_FILE} field 'trunk.files' is missing")
    for name in (TRUNK_SPEC_FILE, TRUNK_WEIGHTS_FILE):
        _check_file(directory / name, files.get(name), label)
    try:
        return Trunk.load(directory)
    except TrunkError as e:
        raise ServingError(f"{label}: {e}") from None


def download_version(name: str, version: int, dst: str | Path, tracking_uri: str | None) -> Path:
    """Download the folder registered model ``name`` v<version> points at (its ``source``) into ``dst``.

    The version is looked up with a client on ``tracking_uri`` (registry included) and its
    source downloaded from there: ``models:/`` URIs alone resolve against MLflow's global
    registry URI, not the one given.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, str(int(version)))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=uri))


def _fetch_trunk(version: int, tracking_uri: str | None) -> Trunk:
    """``trunk`` v<version> from the registry the caller points at."""
    import mlflow

    label = f"trunk v{version}"
    with tempfile.TemporaryDirectory(prefix="serving-trunk-") as tmp:
        try:
            local = download_version("trunk", version, tmp, tracking_uri)
        except Exception as e:  # noqa: BLE001 - any store, any error: one line saying where it looked
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ServingError(f"{label}: cannot be fetched from the registry at "
                               f"{tracking_uri or mlflow.get_registry_uri()} ({first})") from None
        try:
            return Trunk.load(Path(local))
        except TrunkError as e:
            raise ServingError(f"{label}: {e}") from None


def load_components(manifest_path: str | Path, *, tracking_uri: str | None = None
                    ) -> tuple[Trunk, dict[str, LoadedHead], dict[str, Any]]:
    """The verified trunk and heads a model's manifest describes.

    Args:
        manifest_path: the model's ``serving.json``; its pack (or, before packs, its head
            folders) is relative to its folder.
        tracking_uri: for a head model, where to fetch its trunk (None: MLflow's current URI).

    Returns:
        ``(trunk, {head name: LoadedHead}, manifest)``.

    Raises:
        ServingError: a file is missing or does not match its hash, the pack does not hold
            exactly the heads listed, or a trunk_id differs.
        heads.store.HeadArtifactError: a head file does not match the hash recorded at its
            registration, or is not what the platform writes (one line naming it).
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    base = manifest_path.parent
    entry = manifest["trunk"]
    if manifest["kind"] == "release":
        trunk = _load_local_trunk(base / entry.get("dir", "trunk"), entry, f"trunk v{entry['version']}")
    else:
        trunk = _fetch_trunk(entry["version"], tracking_uri)
    if trunk.trunk_id != entry["trunk_id"]:
        raise ServingError(f"trunk v{entry['version']} has trunk_id {trunk.trunk_id} but {MANIFEST_FILE} "
                           f"records {entry['trunk_id']}; this model's heads were trained on that one")
    packed = None
    if "pack" in manifest:
        try:
            packed = read_pack(base, expected=manifest["pack"], recorded_in=MANIFEST_FILE)
        except PackError as e:
            raise ServingError(str(e)) from None
        extra = sorted(set(packed) - set(manifest["heads"]))
        if extra:
            raise ServingError(f"{base / PACK_INDEX}: holds head '{extra[0]}', which {MANIFEST_FILE} does not list")
    heads: dict[str, LoadedHead] = {}
    for name, h in sorted(manifest["heads"].items()):
        version = f" v{h['version']}" if h.get("version") is not None else ""
        expected = {WEIGHTS_SHA256: h[WEIGHTS_SHA256], SPEC_SHA256: h[SPEC_SHA256]}
        if packed is None:
            folder = (base / h["dir"]).resolve()
            head = load_head(folder, expected=expected, label=f"head.{name}{version} ({folder})")
        else:
            p = packed.get(name)
            if p is None or p.version != h.get("version"):
                raise ServingError(f"{base / PACK_INDEX}: does not hold head.{name}{version}, which "
                                   f"{MANIFEST_FILE} lists")
            head = p.load(expected=expected, label=f"head.{name}{version} (in {base / PACK_WEIGHTS})")
        if head.meta.get("trunk_id") != trunk.trunk_id:
            raise ServingError(f"head.{name}{version} was trained on trunk_id {head.meta.get('trunk_id')} but "
                               f"its trunk is {trunk.trunk_id}")
        heads[name] = head
    return trunk, heads, manifest


def model_settings(model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`DEFAULT_CONFIG` updated with the model's config; unknown keys are refused."""
    config = dict(model_config or {})
    config.pop("tracking_uri", None)
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ServingError(f"model_config key(s) {', '.join(unknown)} unknown; known: "
                           f"{', '.join(DEFAULT_CONFIG)}, tracking_uri")
    out = {**DEFAULT_CONFIG, **config}
    if not isinstance(out["batch_size"], int) or isinstance(out["batch_size"], bool) or out["batch_size"] < 1:
        raise ServingError(f"model_config 'batch_size' must be a positive integer, got {out['batch_size']!r}")
    return out


@dataclass
class _Inputs:
    """A frame's rows as the names the reader opens and the names rows are reported under."""

    read_as: list[str]
    shown_as: list[str | None]
    named: list[str]
    memory: list[str]


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _inputs(frame: pd.DataFrame, prefix: str) -> _Inputs:
    has_path, has_image = PATH_COLUMN in frame.columns, IMAGE_COLUMN in frame.columns
    if not has_path and not has_image:
        raise ServingError(f"input has columns {list(map(str, frame.columns))}; it needs '{PATH_COLUMN}' "
                           f"(local paths or fsspec URIs) or '{IMAGE_COLUMN}' (encoded image bytes)")
    paths = frame[PATH_COLUMN].tolist() if has_path else [None] * len(frame)
    images = frame[IMAGE_COLUMN].tolist() if has_image else [None] * len(frame)
    out = _Inputs([], [], [], [])
    for row, (path, image) in enumerate(zip(paths, images, strict=True)):
        path = None if _is_null(path) else path
        if path is not None and not isinstance(path, str):
            raise ServingError(f"row {row}: '{PATH_COLUMN}' must be a string, got {type(path).__name__}")
        if _is_null(image):
            if path is None:
                raise ServingError(f"row {row}: neither '{PATH_COLUMN}' nor '{IMAGE_COLUMN}' is set")
            if path.startswith(_MEMORY_ROOT.split("//")[0] + "//"):
                # The process's in-memory file system holds other calls' image bytes: never a caller's path.
                raise ServingError(f"row {row}: '{PATH_COLUMN}' {path!r}: memory:// paths are not read; "
                                   f"send the bytes in '{IMAGE_COLUMN}'")
            out.read_as.append(path)
            out.shown_as.append(path)
            out.named.append(path)
            continue
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise ServingError(f"row {row}: '{IMAGE_COLUMN}' must be encoded image bytes, got {type(image).__name__}")
        uri = f"{prefix}/{row}"
        out.read_as.append(uri)
        out.memory.append(uri)
        out.shown_as.append(path)  # bytes are classified; a path beside them only names the row
        out.named.append(path if path is not None else f"{IMAGE_COLUMN}[{row}]")
    return out


class Classifier:
    """One trunk and its heads, classifying frames exactly as bulk classification does.

    Args:
        trunk: the trunk.
        heads: ``{head name: LoadedHead}``.
        batch_size: inputs per trunk forward (bulk's ``batch_size``; rows equal bulk's
            bit for bit when both cut the same batches).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        draft: decode JPEGs in Pillow's draft mode, as bulk does by default.
    """

    def __init__(self, trunk: Trunk, heads: Mapping[str, LoadedHead], *, batch_size: int = 64,
                 device: str = "auto", draft: bool = True) -> None:
        self.bank = HeadBank(heads)
        self.names = list(self.bank.names)
        self.batch_size = int(batch_size)
        self.transform = eval_transform(trunk.data_config)
        self.draft_side = decode_side(trunk.data_config) if draft else None
        self.predictor = BatchPredictor(trunk, self.bank, resolve_device(device))
        self.trunk_id = trunk.trunk_id

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row: ``path``, ``sha256``, ``error``, then per head (sorted)
        ``<head>_label`` (string) and ``<head>_score`` (float32); a bad image gets an ``error``
        and nulls, never an exception.

        Args:
            frame: a ``path`` column (local paths or fsspec URIs) and/or an ``image`` column
                (encoded bytes; when set, the bytes are classified and ``path`` only names the row).

        Raises:
            ServingError: the frame has neither column, or a row has neither value.
        """
        inputs = _inputs(frame, f"{_MEMORY_ROOT}/{uuid.uuid4().hex}")
        columns = empty_columns(self.names)
        memory = None
        if inputs.memory:
            import fsspec

            memory = fsspec.filesystem("memory")
            images = frame[IMAGE_COLUMN].tolist()
            for uri in inputs.memory:
                memory.pipe_file(uri, bytes(images[int(uri.rsplit("/", 1)[1])]))
        try:
            for start in range(0, len(inputs.read_as), self.batch_size):
                indices = list(range(start, min(start + self.batch_size, len(inputs.read_as))))
                batch = decode_batch(indices, [inputs.read_as[i] for i in indices], self.transform, self.draft_side)
                batch_rows(batch, self.predictor(batch.pixels), columns)
        finally:
            if memory is not None:
                for uri in inputs.memory:
                    memory.rm_file(uri)
        # Rows read from memory are reported under the caller's names, in their errors too.
        columns["path"] = list(inputs.shown_as)
        columns["error"] = [e if e is None or read == named else e.replace(read, named)
                            for e, read, named in zip(columns["error"], inputs.read_as, inputs.named, strict=True)]
        out = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()})
        for name in self.names:
            out[f"{name}_score"] = pd.to_numeric(out[f"{name}_score"]).astype("float32")
        return out


def classifier_from_manifest(manifest_path: str | Path, model_config: Mapping[str, Any] | None = None) -> Classifier:
    """The :class:`Classifier` of a model folder's manifest, with the model's settings (:func:`model_settings`)."""
    config = dict(model_config or {})
    settings = model_settings(config)
    trunk, heads, _ = load_components(manifest_path, tracking_uri=config.get("tracking_uri") or None)
    return Classifier(trunk, heads, **settings)
