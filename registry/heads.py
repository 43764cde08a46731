"""Head versions in MLflow: one registered model ``head.<name>`` per head.

Each version's run (experiment ``heads``, run name ``<name>``) carries DESIGN's metrics
(``val_accuracy``, ``val_macro_f1``, ``params``, ``added_gflops``,
``added_ms_per_image``) plus ``recall.<class>``, ``slice_accuracy.<slice>`` and
``slice_size.<slice>`` (names outside MLflow's character set get ``_``); the
version carries the tags ``trunk_id``, ``tap``, ``config_sha``, ``data_sha``, ``owner``,
``trunk_version`` and ``gate`` (``passed``/``failed``). Artifacts: ``head/`` (safetensors
plus JSON, loaded without unpickling), ``confusion.png``, ``config/<name>.yaml`` and
``gate.txt``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from heads.evaluate import plot_confusion
from heads.gate import GateReport, check_gate
from heads.result import HeadResult
from heads.store import LoadedHead, load_head, save_head
from registry.tracking import RegistryError, ensure_registered_model, experiment_id, is_not_found
from registry.trunks import get_trunk_version, metrics_batch, params_batch

ARTIFACT_PATH = "head"
REQUIRED_METRICS = ("val_accuracy", "val_macro_f1", "params", "added_gflops", "added_ms_per_image")
# MLflow accepts these characters in metric and param names; anything else becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


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


def gate_for(result: HeadResult) -> GateReport:
    """The head's own gate, checked on its own figures."""
    return check_gate(result.spec.gate, result.metrics, result.slice_accuracy)


def register_head(client: MlflowClient, result: HeadResult, *, trunk_version: int,
                  gate_report: GateReport | None = None, tags: Mapping[str, str] | None = None,
                  metrics: Mapping[str, float] | None = None, artifacts: Mapping[str, str] | None = None) -> int:
    """Register a trained head as a new version of ``head.<name>``.

    Args:
        client: from :func:`registry.tracking.connect`.
        result: the trained, evaluated and costed head.
        trunk_version: the ``trunk`` version whose features it was trained on; its
            ``trunk_id`` must equal the result's.
        gate_report: the gate's verdict; checked here from the head's config when None.
        tags: extra version tags (the refresh cascade marks its versions with ``cascade``).
        metrics: extra run metrics (e.g. the golden set's result).
        artifacts: extra text files for the run, ``{file name: contents}``.

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
    gate = gate_report if gate_report is not None else gate_for(result)
    name = model_name(result.name)
    tags = {"trunk_id": result.trunk_id, "tap": result.tap, "config_sha": result.spec.config_sha,
            "data_sha": result.data_sha, "owner": result.spec.owner, "trunk_version": str(int(trunk_version)),
            "gate": "passed" if gate.passed else "failed", **dict(tags or {})}
    ensure_registered_model(client, name, f"Head '{result.name}' (owner {result.spec.owner}).")
    run = client.create_run(experiment_id(client, "heads"), run_name=result.name,
                            tags={"head": result.name, **tags})
    run_id = run.info.run_id
    try:
        params = {safe_key(k): v for k, v in flatten(result.spec.config).items()}
        params.update({"classes": ",".join(result.classes), "num_classes": len(result.classes),
                       "in_features": result.in_features, "trunk_version": int(trunk_version)})
        client.log_batch(run_id, metrics=metrics_batch(metrics), params=params_batch(params))
        with tempfile.TemporaryDirectory(prefix="head-") as tmp:
            _write_artifacts(result, gate, f"{name} (trunk v{trunk_version})", Path(tmp))
            for file_name, text in (artifacts or {}).items():
                (Path(tmp) / file_name).write_text(text)
            client.log_artifacts(run_id, tmp)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
                                         run_id=run_id, tags=tags,
                                         description=result.spec.config.get("description") or None)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return int(mv.version)


def get_head_version(client: MlflowClient, name: str, version: int):
    """The MLflow ``ModelVersion`` of ``head.<name>`` v<version>; RegistryError when missing."""
    try:
        return client.get_model_version(model_name(name), str(int(version)))
    except MlflowException as e:
        if is_not_found(e):
            raise RegistryError(f"{model_name(name)} v{version} does not exist in the registry") from None
        raise


def head_tags(client: MlflowClient, name: str, version: int) -> dict[str, str]:
    """The tags of ``head.<name>`` v<version> (trunk_id, tap, owner, gate, ...)."""
    return dict(get_head_version(client, name, version).tags)


def load_head_version(client: MlflowClient, name: str, version: int) -> LoadedHead:
    """Rebuild ``head.<name>`` v<version> from its safetensors and JSON (no unpickling).

    Raises:
        RegistryError: no such version, or its stored ``trunk_id`` disagrees with its tag.
    """
    mv = get_head_version(client, name, version)
    with tempfile.TemporaryDirectory(prefix="head-") as tmp:
        local = client.download_artifacts(mv.run_id, ARTIFACT_PATH, tmp)
        head = load_head(Path(local))
    tagged = mv.tags.get("trunk_id")
    if tagged and tagged != head.meta.get("trunk_id"):
        raise RegistryError(f"{model_name(name)} v{version}: tag 'trunk_id' says {tagged} but its head.json "
                            f"says {head.meta.get('trunk_id')}")
    return head


def head_metrics(client: MlflowClient, name: str, version: int) -> dict[str, float]:
    """The metrics logged on the run of ``head.<name>`` v<version>."""
    mv = get_head_version(client, name, version)
    return dict(client.get_run(mv.run_id).data.metrics)
