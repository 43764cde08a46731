"""The refresh cascade: retrain every production head on a candidate trunk, gate each, promote all or nothing.

For every head of release@production the cascade reads the head's own config (the copy
stored with its production version, so the head is retrained exactly as its team
configured it, seed included), trains it on the candidate trunk (features re-extracted
into the cache; branch heads copy their layers from the candidate), evaluates it on the
same validation data and slices, runs its golden set, and checks the model contract of
:mod:`heads.checks.contract` against the production version. If every head passes, one new
``release`` (the candidate trunk plus every new head version) becomes production by
compare-and-swap against the production version the cascade started from; otherwise
production is untouched and the report says which heads block and why.

Resuming is by construction: a head version registered on the candidate's ``trunk_id``
with the same ``config_sha`` and ``data_sha`` was trained from the same recipe, so a
restarted cascade reuses it and re-checks its contract from its logged metrics; the
release a cascade creates carries the tag ``cascade=<id>`` (``id``: the candidate's
``trunk_id`` and the production version it started from), so a cascade killed after
creating it but before moving production moves production to that same release.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient

from heads.checks.contract import GoldenResult, Tolerances, check_contract
from heads.checks.gate import GateReport
from heads.checks.golden import check_golden, read_golden
from heads.spec import HeadConfigError, HeadSpec, read_config_file, validate
from heads.store import HeadArtifactError, LoadedHead
from heads.training.data import data_roots, load_labelled_data
from registry.jobs.train import train_head_on
from registry.reports.cascade import log_cascade_report
from registry.store.heads import (
    find_head_version_by_tags,
    get_head_version,
    head_metrics,
    head_run_metrics,
    load_head_version,
    model_name,
    register_head,
)
from registry.store.releases import (
    CANDIDATE,
    PRODUCTION,
    Release,
    ReleaseError,
    create_release,
    find_releases_by_tag,
    get_release,
    move_alias,
)
from registry.store.tracking import ArtifactError, RegistryError, download_artifact
from registry.store.trunks import clear_trunk_alias, get_trunk_version, load_trunk, trunk_alias_versions
from registry.reports.summary import narrator
from registry.store.workspace import Workspace
from trunk.decode import ImageError
from trunk.model import Trunk, TrunkError

log = logging.getLogger(__name__)

CASCADE_TAG = "cascade"
# What can go wrong with one head without stopping the others: its verdict becomes FAIL.
HEAD_ERRORS = (HeadConfigError, HeadArtifactError, TrunkError, RegistryError, ImageError, ValueError,
               FileNotFoundError, OSError)


class CascadeError(RuntimeError):
    """The cascade cannot start; the message says why and what to do."""


@dataclass
class HeadOutcome:
    """One production head, retrained on the candidate and checked.

    Attributes:
        name: the head.
        production_version: its version in the production release.
        candidate_version: the retrained version; None when retraining failed.
        status: ``trained``, ``reused`` (same recipe on the same trunk, registered
            before) or ``failed``.
        contract: the verdict against production (:func:`heads.checks.contract.check_contract`).
        production_metrics: the production version's run metrics.
        candidate_metrics: the retrained version's run metrics (None when failed).
        golden: the golden set's result, when the head has one.
        reason: why retraining failed, when it did.
    """

    name: str
    production_version: int
    candidate_version: int | None
    status: str
    contract: GateReport
    production_metrics: dict[str, float]
    candidate_metrics: dict[str, float] | None = None
    golden: GoldenResult | None = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.contract.passed

    def blocking(self) -> str:
        """Why this head blocks the refresh, one line ('' when it passes)."""
        if self.passed:
            return ""
        parts = []
        for c in self.contract.failed:
            value = "missing" if c.value is None else f"{c.value:.4g}"
            parts.append(f"{c.name} {value} {'<' if c.op == '>=' else '>'} {c.limit:.4g}" +
                         (f" ({c.note})" if c.note else ""))
        return "; ".join(parts)


@dataclass
class CascadeResult:
    """What one cascade run did.

    Attributes:
        cascade_id: the candidate's trunk_id and the starting production version, hashed.
        candidate_version: the candidate ``trunk`` version.
        candidate: the candidate trunk.
        production: the release production pointed at when the cascade began.
        outcomes: one per production head, by name.
        promoted: the new production release, when every head passed and it moved.
        refused: why promotion was refused (production moved meanwhile), else None.
        report: paths and run id of the report (:mod:`registry.reports.cascade`).
    """

    cascade_id: str
    candidate_version: int
    candidate: Trunk
    production: Release
    outcomes: dict[str, HeadOutcome] = field(default_factory=dict)
    promoted: Release | None = None
    refused: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes.values())

    @property
    def blocked(self) -> list[str]:
        return sorted(n for n, o in self.outcomes.items() if not o.passed)

    @property
    def verdict(self) -> str:
        if self.promoted is not None:
            return "promoted"
        if self.refused:
            return "refused"
        return "blocked" if not self.passed else "passed, not promoted"


def resolve_candidate(client: MlflowClient, candidate: str | int) -> int:
    """The candidate ``trunk`` version: the alias ``candidate`` or a version number."""
    if str(candidate) == CANDIDATE:
        version = trunk_alias_versions(client).get(CANDIDATE)
        if version is None:
            raise CascadeError("no trunk version has the alias 'candidate': build one with python -m tools.refresh "
                               "candidate=multitask|timm|distill, tools.train_trunk or tools.register_trunk")
        return int(version)
    try:
        version = int(candidate)
    except ValueError:
        raise CascadeError(f"candidate must be 'candidate' or a trunk version number, got '{candidate}'") from None
    get_trunk_version(client, version)  # RegistryError when missing
    return version


def cascade_id(trunk_id: str, production_version: int) -> str:
    return hashlib.sha256(f"{trunk_id}:{production_version}".encode()).hexdigest()[:12]


def stored_spec(client: MlflowClient, name: str, version: int, context: dict[str, Any] | None = None) -> HeadSpec:
    """The head config a version was trained from (its ``config/<name>.yaml`` artifact), validated."""
    mv = get_head_version(client, name, version)
    source = f"{model_name(name)} v{version} (config/{name}.yaml)"
    with tempfile.TemporaryDirectory(prefix="head-config-") as tmp:
        try:
            local = download_artifact(client, mv.run_id, f"config/{name}.yaml", tmp)
        except ArtifactError as e:
            raise HeadConfigError(source, "<file>", f"cannot be read from MLflow: {e}") from None
        raw = read_config_file(local, source)  # size, alias and parse checks, as for a team's file
    return validate(raw, source, context=context, expected_name=name)


def _existing_version(client: MlflowClient, name: str, trunk_id: str, config_sha: str, data_sha: str) -> int | None:
    return find_head_version_by_tags(client, name, {"trunk_id": trunk_id, "config_sha": config_sha,
                                                    "data_sha": data_sha})


def _golden(spec: HeadSpec, trunk: Trunk, head: LoadedHead, device: str, batch_size: int) -> GoldenResult | None:
    path = spec.gate.get("golden")
    if not path:
        return None
    items = read_golden(path, list(head.meta["classes"]), spec.source, allow_roots=data_roots(spec))
    return check_golden(trunk, spec.name, head, items, source=str(path), device=device, batch_size=batch_size)


def _retrain(client: MlflowClient, spec: HeadSpec, trunk: Trunk, tv: int, cid: str, *, workspace: Workspace,
             production_metrics: dict[str, float], tolerances: Tolerances, batch_size: int, num_workers: int,
             device: str, progress: bool) -> tuple[int, str, GoldenResult | None, GateReport]:
    data = load_labelled_data(spec)
    done = _existing_version(client, spec.name, trunk.trunk_id, spec.config_sha, data.data_sha)
    if done is not None:
        tags = get_head_version(client, spec.name, done).tags
        golden = _golden(spec, trunk, load_head_version(client, spec.name, done), device, batch_size)
        contract = check_contract(production_metrics, head_metrics(client, spec.name, done), tolerances=tolerances,
                                  own_gate_passed=tags.get("gate") == "passed", golden=golden)
        return done, "reused", golden, contract
    result, gate, _ = train_head_on(client, spec, trunk, tv, workspace=workspace, batch_size=batch_size,
                                    num_workers=num_workers, device=device, progress=progress, data=data)
    golden = _golden(spec, trunk, LoadedHead(result.module, result.meta()), device, batch_size)
    # The same flattening MLflow gets, so the contract reads what a resumed cascade will read.
    contract = check_contract(production_metrics, head_run_metrics(result), tolerances=tolerances,
                              own_gate_passed=gate.passed, golden=golden)
    extra = {} if golden is None else {"golden_total": golden.total, "golden_wrong": len(golden.wrong)}
    version = register_head(client, result, trunk_version=tv, gate_report=gate,
                            tags={CASCADE_TAG: cid, "contract": "passed" if contract.passed else "failed"},
                            metrics=extra,
                            artifacts={"contract.txt": contract.format(f"{model_name(spec.name)} on trunk v{tv} "
                                                                       f"vs production") + "\n"})
    return version, "trained", golden, contract


def run_cascade(client: MlflowClient, workspace: Workspace, *, candidate: str | int = CANDIDATE,
                tolerances: Tolerances = Tolerances(), batch_size: int = 64, num_workers: int = 0,
                device: str = "cpu", progress: bool = True, promote: bool = True,
                echo: Callable[[str], None] | None = None) -> CascadeResult:
    """Retrain and gate every production head on a candidate trunk; promote everything or nothing.

    Args:
        client: the registry.
        workspace: feature cache and run folders.
        candidate: ``candidate`` (the trunk alias) or a ``trunk`` version.
        tolerances: platform defaults; each head's ``gate`` block may override them.
        batch_size, num_workers, device, progress: as for head training.
        promote: move production when every head passes (False: gate and report only).
        echo: also receives each step's line (every line is logged); the tool passes ``print``.

    Returns:
        The outcome per head, the promotion (or why not) and the report's locations.

    Raises:
        CascadeError: no production release, no candidate, or the candidate already serves.
    """
    production = get_release(client, PRODUCTION)
    if production is None:
        raise CascadeError("there is no production release, so there is nothing to cascade: promote heads first")
    tv = resolve_candidate(client, candidate)
    if tv == production.trunk_version:
        _clear_candidate_alias(client, tv)  # a cascade stopped right after promoting leaves it behind
        raise CascadeError(f"trunk v{tv} is already production's trunk (release v{production.version}); "
                           f"nothing to refresh")
    trunk = load_trunk(client, tv)
    cid = cascade_id(trunk.trunk_id, production.version)
    result = CascadeResult(cid, tv, trunk, production)
    say = narrator(log, echo)
    say(f"cascade {cid}: candidate trunk v{tv} ({trunk.model_name}, trunk_id {trunk.trunk_id}) against "
         f"release v{production.version} (trunk v{production.trunk_version}, {len(production.heads)} heads)")
    context = {"workspace": str(workspace.root)}
    for i, (name, pv) in enumerate(sorted(production.heads.items()), start=1):
        prod_metrics = head_metrics(client, name, pv)
        try:
            spec = stored_spec(client, name, pv, context)
            tol = Tolerances.for_head(spec.gate, tolerances)
            version, status, golden, contract = _retrain(
                client, spec, trunk, tv, cid, workspace=workspace, production_metrics=prod_metrics, tolerances=tol,
                batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
            outcome = HeadOutcome(name, pv, version, status, contract, prod_metrics,
                                  head_metrics(client, name, version), golden)
        except HEAD_ERRORS as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("%s: retraining on trunk v%s failed: %s", model_name(name), tv, reason)
            outcome = HeadOutcome(name, pv, None, "failed", check_contract(prod_metrics, None, tolerances=tolerances,
                                                                           missing_reason=reason),
                                  prod_metrics, reason=reason)
        result.outcomes[name] = outcome
        got = "-" if outcome.candidate_version is None else f"v{outcome.candidate_version}"
        say(f"  [{i}/{len(production.heads)}] {name}: v{pv} -> {got} ({outcome.status}) "
             f"{'PASS' if outcome.passed else 'FAIL: ' + outcome.blocking()}")
    if result.passed and promote:
        result.promoted, result.refused = _promote(client, result, say)
    result.report = log_cascade_report(client, workspace, result, device=device)
    return result


def _promote(client: MlflowClient, result: CascadeResult, say: Callable[[str], None]
             ) -> tuple[Release | None, str | None]:
    heads = {n: o.candidate_version for n, o in result.outcomes.items() if o.candidate_version is not None}
    expected = result.production.version
    say(f"every head passed: promoting trunk v{result.candidate_version} with {len(heads)} heads "
         f"(production must still be release v{expected})")
    try:
        made = find_releases_by_tag(client, CASCADE_TAG, result.cascade_id)
        if made:  # an earlier run of this cascade created the release and stopped before moving production
            current = get_release(client, PRODUCTION)
            if current is not None and current.version == made[0]:
                release = current
            else:
                release = move_alias(client, made[0], expected=expected,
                                     note=f"refresh cascade {result.cascade_id}")
        else:
            release = create_release(client, result.candidate_version, heads, expected_production=expected,
                                     note=f"refresh: trunk v{result.candidate_version} (cascade {result.cascade_id})",
                                     tags={CASCADE_TAG: result.cascade_id})
    except ReleaseError as e:
        say(f"promotion refused: {e}")
        return None, str(e)
    _clear_candidate_alias(client, result.candidate_version)
    say(f"production is now release v{release.version} (trunk v{release.trunk_version})")
    return release, None


def _clear_candidate_alias(client: MlflowClient, version: int) -> None:
    # The alias is a convenience; production already moved, so a refusal is only logged.
    clear_trunk_alias(client, CANDIDATE, version)
