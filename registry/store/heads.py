"""Head versions in MLflow: one registered model ``head.<name>`` per head.

Each version's run (experiment ``heads``, run name ``<name>``) carries DESIGN's metrics
(``val_accuracy``, ``val_macro_f1``, ``params``, ``added_gflops``,
``added_ms_per_image``) plus ``recall.<class>``, ``slice_accuracy.<slice>`` and
``slice_size.<slice>`` (names outside MLflow's character set get ``_``); the
version carries the tags ``trunk_id``, ``tap``, ``config_sha``, ``data_sha``, ``owner``,
``trunk_version``, ``gate`` (``passed``/``failed``), ``trunk_trained_on`` (the digest of the
trunk's record of its training images its validation split was checked against, or
``unknown``; with it the run carries ``val_seen_by_trunk``, ``val_seen_share``,
``val_unseen_images``, ``val_accuracy_unseen``, ``val_macro_f1_unseen``) and the content hashes of its head
files, ``weights_sha256`` and ``spec_sha256`` (hex sha256 of ``head.safetensors`` and
``head.json``). Artifacts: ``head/`` (safetensors plus JSON, loaded without unpickling),
``confusion.png``, ``config/<name>.yaml`` and ``gate.txt``.

The run lasts as long as the head's training: the head job opens it first
(:func:`head_run`), logs the training curves into it epoch by epoch (``train_loss``,
``val_loss``, ``epoch_val_accuracy``, step = epoch: :data:`EPOCH_CURVES`) and the datasets
it read (``<name>.train`` and ``<name>.val``, digest ``data_sha``, source the data folder or
manifest: :func:`log_head_datasets`), and :func:`register_head` registers into it.

The monitoring reference (issue 15, :mod:`heads.monitor.reference`): a version trained by the
platform's jobs also stores ``monitor/reference.safetensors`` (its validation predictions and
the statistics of its training features at its tap), tagged ``monitor_reference_digest`` and
summarised as ``reference.*`` metrics; :func:`head_reference` returns it verified, or None
for a version registered before references were recorded.

Loading a version checks both files against its hash tags before parsing either, so a
file swapped in the artifact store after registration is refused. A version registered
before the hashes were recorded has no such tags: it is refused too, unless the caller
passes ``allow_unverified=True`` (logged as a warning), or an operator who has checked it
records its hashes once with :func:`record_head_hashes`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from heads.training.evaluate import plot_confusion
from heads.checks.gate import GateReport, check_gate
from heads.monitor.reference import HeadReference
from heads.result import HeadResult
from heads.spec import HeadSpec
from heads.training.data import LabelledData
from heads.store import DIGEST_KEYS, HeadArtifactError, LoadedHead, artifact_digests, load_head, save_head
from registry.serving.package import write_head_model
from registry.store.runs import RunLog, tracked_run
from registry.store.tracking import (
    RegistryError,
    all_pages,
    client_cache,
    ensure_registered_model,
    is_not_found,
    run_metrics,
    tagged_artifact,
)
from registry.store.trunks import get_trunk_version

ARTIFACT_PATH = "head"
REQUIRED_METRICS = ("val_accuracy", "val_macro_f1", "params", "added_gflops", "added_ms_per_image")
# MLflow accepts these characters in metric and param names; anything else becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
# Version tags holding the hex sha256 of head.safetensors and head.json, recorded at registration.
WEIGHTS_SHA_TAG, SPEC_SHA_TAG = DIGEST_KEYS
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The monitoring reference (heads.monitor.reference) of a version: artifact path and the tag holding its digest.
REFERENCE_ARTIFACT = "monitor/reference.safetensors"
REFERENCE_DIGEST_TAG = "monitor_reference_digest"
# The per-epoch training curves of a head's run (step = epoch), from its history rows:
# {history field: metric name}. The epoch's validation accuracy is not logged as
# ``val_accuracy``: that is the version's own figure (its best epoch's weights), and
# MLflow's latest value of a key is the one at its largest step, the last epoch's.
EPOCH_CURVES = {"train_loss": "train_loss", "val_loss": "val_loss", "val_accuracy": "epoch_val_accuracy"}

logger = logging.getLogger(__name__)


def model_name(name: str) -> str:
    """The registered model of a head: ``head.<name>``."""
    return f"head.{name}"


def safe_key(key: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . /`` and space)."""
    out = _UNSAFE.sub("_", str(key)).strip()
    out = re.sub(r"/+", "/", out).strip("/")  # MLflow refuses '..', leading '/' and '//'
    return out.replace("..", "_") or "_"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _slice_metrics(slice_accuracy: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, entry in slice_accuracy.items():
        acc = entry.get("accuracy") if isinstance(entry, Mapping) else entry
        if acc is not None:
            out[safe_key(f"slice_accuracy.{name}")] = float(acc)
        if isinstance(entry, Mapping) and entry.get("n") is not None:
            out[safe_key(f"slice_size.{name}")] = float(entry["n"])
    return out


def head_run_metrics(result: HeadResult) -> dict[str, float]:
    """Every metric a head's run logs, under MLflow-safe names.

    Raises:
        RegistryError: one of DESIGN's required metrics is missing.
    """
    missing = [m for m in REQUIRED_METRICS if m not in result.metrics]
    if missing:
        raise RegistryError(f"head '{result.name}': result lacks metric(s) {', '.join(missing)}; "
                            f"required: {', '.join(REQUIRED_METRICS)}")
    metrics = {safe_key(k): float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update({safe_key(f"recall.{c}"): float(r) for c, r in result.per_class_recall.items()})
    metrics.update(_slice_metrics(result.slice_accuracy))
    return metrics


def _write_artifacts(result: HeadResult, gate: GateReport, title: str, root: Path) -> None:
    save_head(root / ARTIFACT_PATH, result.module, result.meta())
    (root / "config").mkdir()
    (root / "config" / f"{result.name}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(result.spec.config)))
    (root / "gate.txt").write_text(gate.format(title) + "\n")
    for path in result.artifacts.values():
        path = Path(path)
        if path.is_file():
            (root / path.name).write_bytes(path.read_bytes())
    if not (root / "confusion.png").exists() and result.confusion:
        plot_confusion(result.confusion, result.classes, root / "confusion.png", title=f"{result.name} (validation)")


def reference_metrics(reference: HeadReference) -> dict[str, float]:
    """The scalar figures of a head's monitoring reference, as run metrics named ``reference.<figure>``.

    ``reference.n_val``, ``reference.low_confidence_share`` (top score below 0.5),
    ``reference.n_train_features``, ``reference.feature_dim``, ``reference.feature_sample_rows``
    (figures that are None, e.g. no features, are left out) and ``reference.label_share.<class>``.
    """
    out: dict[str, float] = {}
    for key, value in reference.summary().items():
        if isinstance(value, Mapping):
            out.update({safe_key(f"reference.label_share.{c}"): float(v) for c, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[safe_key(f"reference.{key}")] = float(value)
    return out


def gate_for(result: HeadResult) -> GateReport:
    """The head's own gate, checked on its own figures."""
    return check_gate(result.spec.gate, result.metrics, result.slice_accuracy)


@contextlib.contextmanager
def head_run(client: MlflowClient, spec: HeadSpec, *, trunk_id: str, trunk_version: int,
             tags: Mapping[str, str] | None = None) -> Iterator[RunLog]:
    """The run of one head's training (experiment ``heads``, run name ``<name>``), open while it trains.

    It starts with what is known before training (``head``, ``trunk_id``, ``tap``,
    ``config_sha``, ``owner``, ``trunk_version``, plus ``tags``); :func:`register_head`
    adds the version's. Pass it to :func:`register_head` as ``run``; it ends ``FINISHED``
    with the block, or ``FAILED`` when training raises (then no version is registered).
    """
    start = {"head": spec.name, "trunk_id": trunk_id, "tap": spec.tap, "config_sha": spec.config_sha,
             "owner": spec.owner, "trunk_version": str(int(trunk_version)), **dict(tags or {})}
    with tracked_run(client, "heads", run_name=spec.name, tags=start) as run:
        yield run


def epoch_curve_logger(run: RunLog):
    """The callback a head's training loop gets: logs each epoch row's :data:`EPOCH_CURVES` live."""
    log_row = run.epoch_logger(EPOCH_CURVES)

    def on_epoch(row: Mapping[str, Any]) -> None:
        log_row({k: v for k, v in row.items() if k in EPOCH_CURVES or k == "epoch"})

    return on_epoch


def log_head_datasets(run: RunLog, name: str, data: LabelledData) -> None:
    """Record the head's labelled data as the run's inputs: ``<name>.train`` (context ``training``)
    and ``<name>.val`` (``validation``), both with digest ``data_sha`` (it covers every row and
    its split) and source the data folder or manifest; profile ``num_rows``."""
    for split, rows, context in (("train", data.train, "training"), ("val", data.val, "validation")):
        run.log_dataset(f"{name}.{split}", data.data_sha, data.source, context=context,
                        profile={"num_rows": len(rows)})


def _history_curves(history: list[dict]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for row in history or []:
        if "epoch" in row:
            values = {EPOCH_CURVES[k]: float(v) for k, v in row.items()
                      if k in EPOCH_CURVES and isinstance(v, (int, float))}
            if values:
                rows[int(row["epoch"])] = values
    return rows


def register_head(client: MlflowClient, result: HeadResult, *, trunk_version: int,
                  gate_report: GateReport | None = None, tags: Mapping[str, str] | None = None,
                  metrics: Mapping[str, float] | None = None, artifacts: Mapping[str, str] | None = None,
                  run: RunLog | None = None) -> int:
    """Register a trained head as a new version of ``head.<name>``.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        result: the trained, evaluated and costed head.
        trunk_version: the ``trunk`` version whose features it was trained on; its
            ``trunk_id`` must equal the result's.
        gate_report: the gate's verdict; checked here from the head's config when None.
        tags: extra version tags (the refresh cascade marks its versions with ``cascade``),
            beside the result's own (:attr:`heads.result.HeadResult.tags`, e.g. ``trunk_trained_on``).
        metrics: extra run metrics (e.g. the golden set's result).
        artifacts: extra text files for the run, ``{file name: contents}``.
        run: the head's run, opened before training (:func:`head_run`) and left open:
            the version's tags are set on it and everything is logged into it. None opens
            and ends a run here (a head trained elsewhere); its training curves are then
            logged from ``result.history``, timestamped now.

    The result's monitoring reference (:attr:`heads.result.HeadResult.reference`), when it
    has one, is stored as ``monitor/reference.safetensors``, its digest as the version tag
    ``monitor_reference_digest`` and its scalar figures as ``reference.*`` run metrics
    (:func:`reference_metrics`); :func:`head_reference` reads it back, verified.

    Returns:
        The new version number. A head that failed its gate is registered too (its
        figures are worth seeing) with tag ``gate=failed``; releases refuse it.

    Raises:
        RegistryError: the trunk version does not exist or has another trunk_id, or a
            required metric is missing.
    """
    trunk_mv = get_trunk_version(client, trunk_version)
    trunk_id = trunk_mv.tags.get("trunk_id")
    if trunk_id != result.trunk_id:
        raise RegistryError(f"head '{result.name}' was trained on trunk_id {result.trunk_id} but trunk "
                            f"v{trunk_version} is trunk_id {trunk_id}; pass the trunk version it was trained on")
    metrics = {**head_run_metrics(result), **{safe_key(k): float(v) for k, v in (metrics or {}).items()}}
    reference = result.reference
    if reference is not None:
        metrics.update(reference_metrics(reference))
    gate = gate_report if gate_report is not None else gate_for(result)
    name = model_name(result.name)
    tags = {"trunk_id": result.trunk_id, "tap": result.tap, "config_sha": result.spec.config_sha,
            "data_sha": result.data_sha, "owner": result.spec.owner, "trunk_version": str(int(trunk_version)),
            "gate": "passed" if gate.passed else "failed", **result.tags, **dict(tags or {})}
    ensure_registered_model(client, name, f"Head '{result.name}' (owner {result.spec.owner}).")
    given = run is not None
    own = head_run(client, result.spec, trunk_id=result.trunk_id, trunk_version=trunk_version, tags=tags)
    with contextlib.nullcontext(run) if given else own as run:
        if given:
            run.set_tags({"head": result.name, **tags})
        if not run.curves:  # not logged live: from the history, as one batch
            run.log_steps(_history_curves(result.history))
        metrics = {k: v for k, v in metrics.items() if k not in run.curves}
        params = {safe_key(k): v for k, v in flatten(result.spec.config).items()}
        params.update({"classes": ",".join(result.classes), "num_classes": len(result.classes),
                       "in_features": result.in_features, "trunk_version": int(trunk_version)})
        run.log(params=params, metrics=metrics)
        with tempfile.TemporaryDirectory(prefix="head-") as tmp:
            _write_artifacts(result, gate, f"{name} (trunk v{trunk_version})", Path(tmp))
            for file_name, text in (artifacts or {}).items():
                (Path(tmp) / file_name).write_text(text)
            # The head folder is also an MLflow pyfunc model (models:/head.<name>/<v>), on its trunk.
            write_head_model(Path(tmp) / ARTIFACT_PATH, trunk_version=int(trunk_version))
            # Hashed from the very files uploaded next; loading compares the store's copy to them.
            digests = artifact_digests(Path(tmp) / ARTIFACT_PATH)
            if reference is not None:
                (Path(tmp) / REFERENCE_ARTIFACT).parent.mkdir(parents=True, exist_ok=True)
                reference.save(Path(tmp) / REFERENCE_ARTIFACT)
                digests[REFERENCE_DIGEST_TAG] = reference.digest
            run.log_folder(tmp)
        mv = client.create_model_version(name, source=f"{run.artifact_uri}/{ARTIFACT_PATH}",
                                         run_id=run.run_id, tags={**tags, **digests},
                                         description=result.spec.config.get("description") or None)
    return int(mv.version)


def get_head_version(client: MlflowClient, name: str, version: int):
    """The MLflow ``ModelVersion`` of ``head.<name>`` v<version>; RegistryError when missing."""
    try:
        return client.get_model_version(model_name(name), str(int(version)))
    except MlflowException as e:
        if is_not_found(e):
            raise RegistryError(f"{model_name(name)} v{version} does not exist in the registry") from None
        raise


# Model names per search_model_versions call: the filter travels in the URL of a GET.
_NAMES_PER_SEARCH = 100


def head_versions(client: MlflowClient, wanted: Mapping[str, int], *, fresh: bool = True) -> dict[str, Any]:
    """The MLflow ``ModelVersion`` of each ``{head name: version}``, in one search per 100 heads.

    Each version seen with its content hashes is also kept for the client's life; with
    ``fresh=False`` those are returned without asking the store again. Only what never
    changes may be read from such a copy: its source, run and content hashes (its files are
    checked against them wherever they are read). Tags (``trunk_id``, ``gate``, monitoring's
    ``drift``) are read fresh: a check of a release asks with ``fresh=True`` (the default).

    Raises:
        RegistryError: a version does not exist.
    """
    cache = client_cache(client, "head_versions")
    wanted = {str(n): int(v) for n, v in wanted.items()}
    found = {} if fresh else {n: cache[(n, v)] for n, v in wanted.items() if (n, v) in cache}
    missing = sorted(n for n in wanted if n not in found)
    for i in range(0, len(missing), _NAMES_PER_SEARCH):
        names = missing[i:i + _NAMES_PER_SEARCH]
        listed = ", ".join(f"'{model_name(n)}'" for n in names)
        try:
            versions = all_pages(client.search_model_versions, f"name IN ({listed})")
        except MlflowException as e:
            if not is_not_found(e):
                raise
            versions = []
        by_key = {(mv.name, int(mv.version)): mv for mv in versions}
        for n in names:
            mv = by_key.get((model_name(n), wanted[n]))
            if mv is None:
                raise RegistryError(f"{model_name(n)} v{wanted[n]} does not exist in the registry")
            found[n] = mv
            if all(_SHA256.match(mv.tags.get(k) or "") for k in DIGEST_KEYS):
                cache[(n, wanted[n])] = mv
    return found


def head_tags(client: MlflowClient, name: str, version: int) -> dict[str, str]:
    """The tags of ``head.<name>`` v<version> (trunk_id, tap, owner, gate, ...)."""
    return dict(get_head_version(client, name, version).tags)


def _label(name: str, version: int) -> str:
    return f"{model_name(name)} v{int(version)}"


def recorded_digests(mv, label: str, allow_unverified: bool) -> dict[str, str] | None:
    """The version's hash tags; None (after a warning) for an unhashed version the caller accepts."""
    recorded = {k: mv.tags.get(k) for k in DIGEST_KEYS}
    present = [k for k, v in recorded.items() if v]
    if not present:
        if not allow_unverified:
            raise HeadArtifactError(
                f"{label}: registered without content hashes (tags {', '.join(DIGEST_KEYS)}), so its files "
                f"cannot be verified; re-register it, or after checking it record them with "
                f"registry.store.heads.record_head_hashes, or load it with allow_unverified=True")
        logger.warning("%s: registered without content hashes; loading it unverified as asked", label)
        return None
    for key, value in recorded.items():
        if not value or not _SHA256.match(value):
            raise HeadArtifactError(f"{label}: tag '{key}' is {value!r}, not a sha256 recorded at registration "
                                    f"(tampered or corrupt)")
    return recorded


def load_head_version(client: MlflowClient, name: str, version: int, *, allow_unverified: bool = False) -> LoadedHead:
    """Rebuild ``head.<name>`` v<version> from its safetensors and JSON (no unpickling).

    Both files are checked against the sha256 tags recorded at registration before either
    is parsed, and the spec may only build a platform head class with the arguments the
    platform writes (see :mod:`heads.store`).

    Args:
        client: from :func:`registry.store.tracking.connect`.
        name: the head's name (without ``head.``).
        version: its version number.
        allow_unverified: accept a version registered before content hashes were recorded
            (no hash tags), with a warning. A version with hash tags is always verified.

    Raises:
        RegistryError: no such version, or its stored ``trunk_id`` disagrees with its tag.
        HeadArtifactError: one line naming the head and version: a file does not match
            its recorded hash, the version has no hashes (unless allowed), or a file is not
            what the platform writes (not safetensors, not JSON, a refused class or argument).
    """
    mv = get_head_version(client, name, version)
    label = _label(name, version)
    expected = recorded_digests(mv, label, allow_unverified)
    with tempfile.TemporaryDirectory(prefix="head-") as tmp:
        local = client.download_artifacts(mv.run_id, ARTIFACT_PATH, tmp)
        head = load_head(Path(local), expected=expected, label=label)
    tagged = mv.tags.get("trunk_id")
    if tagged and tagged != head.meta.get("trunk_id"):
        raise RegistryError(f"{model_name(name)} v{version}: tag 'trunk_id' says {tagged} but its head.json "
                            f"says {head.meta.get('trunk_id')}")
    return head


def head_reference(client: MlflowClient, name: str, version: int) -> HeadReference | None:
    """The monitoring reference ``head.<name>`` v<version> recorded at registration, verified.

    The reference (:class:`heads.monitor.reference.HeadReference`: the head's predicted-label
    counts and top-score histogram on its validation split, and the moments and a bounded
    sample of its training features at its tap) is the artifact
    ``monitor/reference.safetensors`` of the version's run; the version's tag
    ``monitor_reference_digest`` holds its digest, and the downloaded file must hash to it.

    Args:
        client: from :func:`registry.store.tracking.connect`.
        name: the head's name (without ``head.``).
        version: its version number.

    Returns:
        The reference, or None when the version has none (registered before references
        were recorded: no ``monitor_reference_digest`` tag). Its ``features`` is None when
        the head was trained without cached tap features (see its ``meta["features"]``).

    Raises:
        RegistryError: no such version; or, naming the head and version, the tag is set but
            the file is missing, unreadable, or does not match the recorded digest.
    """
    return tagged_artifact(client, get_head_version(client, name, version), REFERENCE_DIGEST_TAG, REFERENCE_ARTIFACT,
                           lambda path, digest: HeadReference.load(path, expected_digest=digest),
                           _label(name, version), "monitoring reference")


def record_head_hashes(client: MlflowClient, name: str, version: int) -> dict[str, str]:
    """Record the content hashes of a version registered before they existed (trust on first use).

    The hashes are those of the files in the artifact store now, so call this only for a
    version whose artifacts you trust as they are; the head must also load (its spec and
    weights pass every other check). A version that already has hash tags is left alone.

    Returns:
        The tags written, ``{"weights_sha256": ..., "spec_sha256": ...}``.

    Raises:
        RegistryError: the version already has hash tags.
        HeadArtifactError: its files do not load.
    """
    mv = get_head_version(client, name, version)
    label = _label(name, version)
    if any(mv.tags.get(k) for k in DIGEST_KEYS):
        raise RegistryError(f"{label} already has content hashes recorded; they are not replaced")
    with tempfile.TemporaryDirectory(prefix="head-") as tmp:
        local = Path(client.download_artifacts(mv.run_id, ARTIFACT_PATH, tmp))
        digests = artifact_digests(local)
        load_head(local, expected=digests, label=label)
    for key, value in digests.items():
        client.set_model_version_tag(model_name(name), str(int(version)), key, value)
    logger.info("%s: recorded content hashes %s", label, digests)
    return digests


def head_metrics(client: MlflowClient, name: str, version: int) -> dict[str, float]:
    """The metrics logged on the run of ``head.<name>`` v<version>."""
    return run_metrics(client, get_head_version(client, name, version).run_id)


def find_head_version_by_tags(client: MlflowClient, name: str, tags: Mapping[str, str]) -> int | None:
    """The lowest version of ``head.<name>`` whose tags include every ``key=value`` of ``tags``, or None."""
    where = "".join(f" and tags.{key}='{value}'" for key, value in tags.items())
    found = client.search_model_versions(f"name='{model_name(name)}'{where}")
    versions = sorted(int(v.version) for v in found)
    return versions[0] if versions else None


def head_model_versions(client: MlflowClient) -> dict[str, list[Any]]:
    """``{head name: its MLflow model versions, oldest first}`` for every registered ``head.<name>``."""
    prefix = model_name("")
    # Two paged searches whatever the number of heads: the models (a head may have no version
    # yet), then every head version at once.
    models = all_pages(client.search_registered_models, f"name LIKE '{prefix}%'")
    out: dict[str, list[Any]] = {m.name[len(prefix):]: [] for m in sorted(models, key=lambda m: m.name)
                                 if m.name.startswith(prefix)}  # SQL LIKE ignores case
    for mv in all_pages(client.search_model_versions, f"name LIKE '{prefix}%'"):
        name = mv.name[len(prefix):]
        if mv.name.startswith(prefix) and name in out:
            out[name].append(mv)
    return {name: sorted(versions, key=lambda mv: int(mv.version)) for name, versions in out.items()}
