"""The refresh cascade: retrain every production head on a candidate trunk, gate each, promote all or nothing.

For every head of release@production the cascade reads the head's own config (the copy
stored with its production version, so the head is retrained exactly as its team
configured it, seed included), trains it on the candidate trunk (features re-extracted
into the cache; branch heads copy their layers from the candidate), evaluates it on the
same validation data and slices, runs its golden set, and checks the model contract of
:mod:`heads.checks.contract` against the production version. Accuracy is compared on
the head's validation images that *neither* trunk trained on (by content hash, from each
trunk version's record): the production head on the production trunk's features and the
candidate head on the candidate's, both from the feature cache; the per-head line says
how many images that was, or that it is unknown (a trunk without a record), in which
case the full split is compared. If every head passes, one new
``release`` (the candidate trunk plus every new head version) becomes production by
compare-and-swap against the production version the cascade started from; otherwise
production is untouched and the report says which heads block and why.

Resuming is by construction: a head version registered on the candidate's ``trunk_id``
with the same ``config_sha`` and ``data_sha`` was trained from the same recipe, so a
restarted cascade reuses it and re-checks its contract from its logged metrics (the
common-unseen figures are recomputed from the registered heads and the cache, so they are
the same); the
release a cascade creates carries the tag ``cascade=<id>`` (``id``: the candidate's
``trunk_id`` and the production version it started from), so a cascade killed after
creating it but before moving production moves production to that same release.

Heads are independent until the promotion, so they can be retrained in parallel
(:class:`Parallel`): ``serial`` runs them one after another in this process; ``process``
spreads them over a pool of worker processes on this machine (``spawn`` start method:
torch and ``fork`` do not mix); ``ray`` sends each head to a Ray task. A worker gets only
plain data (:class:`HeadTask`: tracking URI, workspace, head, candidate version,
settings), opens its own ``MlflowClient`` and loads the candidate trunk itself, and sends
its :class:`HeadOutcome` back as JSON; this process gathers the outcomes and promotes all
or nothing exactly as the serial cascade does. Before fanning out, the candidate's
features for every head's images are extracted here, once per tap, so workers read them
from the cache instead of each computing the same rows. Resuming is per head as above: a
killed parallel cascade leaves the heads that finished registered, and the next run reuses
them; workers end when the process that started them dies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.contract import CommonUnseen, GoldenResult, HeldoutPair, Tolerances, check_contract
from heads.checks.heldout import heldout_metrics
from heads.checks.gate import Check, GateReport
from heads.checks.golden import check_golden, read_golden
from heads.spec import HeadConfigError, HeadSpec, read_config_file, validate
from heads.store import HeadArtifactError, LoadedHead
from heads.training.data import LabelledData, data_roots, load_labelled_data
from registry.jobs.extract import extract_job
from registry.jobs.train import train_head_on
from registry.reports.cascade import log_cascade_report
from registry.store.heads import (
    find_head_version_by_tags,
    get_head_version,
    head_metrics,
    head_run,
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
from registry.store.runs import RunLog
from registry.store.tracking import ArtifactError, RegistryError, client_uri, connect, download_artifact
from registry.store.trunks import (
    clear_trunk_alias,
    get_trunk_version,
    load_trunk,
    trunk_alias_versions,
    trunk_trained_on,
)
from registry.reports.summary import narrator
from registry.store.workspace import Workspace
from trunk.decode import ImageError
from trunk.loop import predict
from trunk.model import POOLED, Trunk, TrunkError
from trunk.seen import SeenImages

log = logging.getLogger(__name__)

CASCADE_TAG = "cascade"
# Rows per forward pass when scoring heads on the common unseen subset.
SCORE_CHUNK = 256
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
        unseen: both versions scored on the validation images neither trunk trained on
            (``images`` None: unknown); None when retraining failed.
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
    unseen: CommonUnseen | None = None

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


@dataclass
class CommonUnseenScorer:
    """Scores production and candidate heads on the validation images neither trunk trained on.

    Built once per cascade from both trunk versions' records
    (:func:`registry.store.trunks.trunk_trained_on`). Features come from the feature cache
    (extracted when missing), as for head training, so a resumed cascade gets the same
    figures from the same registered heads.

    Attributes:
        excluded: the union of both records; None when either trunk has none (unknown).
        note: why it is unknown.
    """

    client: MlflowClient
    workspace: Workspace
    production: Release
    excluded: SeenImages | None
    note: str
    batch_size: int
    num_workers: int
    device: str
    _production_trunk: Trunk | None = None

    @classmethod
    def for_cascade(cls, client: MlflowClient, workspace: Workspace, production: Release, candidate_version: int,
                    **run: Any) -> CommonUnseenScorer:
        records = {v: trunk_trained_on(client, v) for v in (production.trunk_version, candidate_version)}
        missing = [f"trunk v{v}" for v, r in records.items() if r is None]
        if missing:
            return cls(client, workspace, production, None,
                       f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no record of "
                       f"{'its' if len(missing) == 1 else 'their'} training images", **run)
        prod, cand = records.values()
        return cls(client, workspace, production, prod.union(cand), "", **run)

    def score(self, spec: HeadSpec, data: LabelledData, candidate: Trunk, head: LoadedHead) -> CommonUnseen:
        """Both versions of ``spec``'s head on its common unseen validation images."""
        if self.excluded is None:
            return CommonUnseen(None, note=self.note)
        paths = [s.path for s in data.val]
        cand = self._extract(candidate, paths, head.tap)
        kept = [(s, sha) for s, sha in zip(data.val, cand.shas) if sha]
        kept = [(s, sha) for (s, sha), seen in zip(kept, self.excluded.mask(sha for _, sha in kept)) if not seen]
        if not kept:
            return CommonUnseen(0)
        shas = [sha for _, sha in kept]
        truth = [data.classes[s.label] for s, _ in kept]
        production_head = load_head_version(self.client, spec.name, self.production.heads[spec.name])
        prod_trunk = self._production()
        prod = self._extract(prod_trunk, [s.path for s, _ in kept], production_head.tap)
        return CommonUnseen(
            len(kept),
            production_accuracy=self._accuracy(production_head, prod_trunk, prod.caches[production_head.tap].load(shas),
                                               truth),
            candidate_accuracy=self._accuracy(head, candidate, cand.caches[head.tap].load(shas), truth))

    def heldout(self, spec: HeadSpec, candidate: Trunk, head: LoadedHead) -> HeldoutPair | None:
        """Both versions of ``spec``'s head on the held-out set its config names; None when it names none."""
        cand = heldout_metrics(candidate, head, spec, device=self.device, batch_size=self.batch_size)
        if cand is None:
            return None
        production_head = load_head_version(self.client, spec.name, self.production.heads[spec.name])
        prod = heldout_metrics(self._production(), production_head, spec, device=self.device,
                               batch_size=self.batch_size)
        return HeldoutPair(str(spec.data["heldout"]), cand.images, prod.accuracy, cand.accuracy)

    def _production(self) -> Trunk:
        if self._production_trunk is None:
            self._production_trunk = load_trunk(self.client, self.production.trunk_version)
        return self._production_trunk

    def _extract(self, trunk: Trunk, paths: list[str], tap: str):
        return extract_job(trunk, paths, workspace=self.workspace, taps=(tap,), batch_size=self.batch_size,
                           num_workers=self.num_workers, device=self.device, progress=False)

    def _accuracy(self, head: LoadedHead, trunk: Trunk, x: torch.Tensor, truth: list[str]) -> float:
        # As in training: branch heads read the tap's map (mixed precision on CUDA), pooled heads the vector.
        if head.tap != POOLED:
            x = x.view(-1, *trunk.tap(head.tap).shape)
        dev = torch.device(self.device)
        module = head.module.to(dev)
        try:
            logits = predict(module, x, dev, chunk=SCORE_CHUNK, mixed_precision=head.tap != POOLED)
        finally:
            module.cpu()
        classes = head.classes
        return sum(classes[int(i)] == t for i, t in zip(logits.argmax(1), truth)) / len(truth)


def _unseen_metrics(unseen: CommonUnseen) -> dict[str, float]:
    # On the version the cascade trained, for MLflow; the contract itself always recomputes them.
    if unseen.images is None:
        return {}
    out = {"contract_unseen_images": float(unseen.images)}
    if unseen.images:
        out.update(contract_unseen_production_accuracy=unseen.production_accuracy,
                   contract_unseen_candidate_accuracy=unseen.candidate_accuracy)
    return out


def _retrain(client: MlflowClient, spec: HeadSpec, trunk: Trunk, tv: int, cid: str, *, workspace: Workspace,
             production_metrics: dict[str, float], tolerances: Tolerances, scorer: CommonUnseenScorer,
             batch_size: int, num_workers: int, device: str, progress: bool
             ) -> tuple[int, str, GoldenResult | None, GateReport, CommonUnseen]:
    # Split as train_head_on would on this trunk, so a resumed cascade finds the same data_sha.
    data = load_labelled_data(spec, avoid=trunk_trained_on(client, tv), hashes=workspace.content_hashes())
    done = _existing_version(client, spec.name, trunk.trunk_id, spec.config_sha, data.data_sha)
    if done is not None:
        tags = get_head_version(client, spec.name, done).tags
        head = load_head_version(client, spec.name, done)
        golden = _golden(spec, trunk, head, device, batch_size)
        unseen = scorer.score(spec, data, trunk, head)
        contract = check_contract(production_metrics, head_metrics(client, spec.name, done), tolerances=tolerances,
                                  own_gate_passed=tags.get("gate") == "passed", golden=golden, unseen=unseen,
                                  heldout=scorer.heldout(spec, trunk, head))
        return done, "reused", golden, contract, unseen
    # The head's run spans its training and checks; a head that fails on the way ends it FAILED, unregistered.
    with head_run(client, spec, trunk_id=trunk.trunk_id, trunk_version=tv, tags={CASCADE_TAG: cid}) as run:
        return _train_and_register(client, spec, trunk, tv, cid, run, data, workspace=workspace,
                                   production_metrics=production_metrics, tolerances=tolerances, scorer=scorer,
                                   batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)


def _train_and_register(client: MlflowClient, spec: HeadSpec, trunk: Trunk, tv: int, cid: str, run: RunLog,
                        data: LabelledData, *, workspace: Workspace, production_metrics: dict[str, float],
                        tolerances: Tolerances, scorer: CommonUnseenScorer, batch_size: int, num_workers: int,
                        device: str, progress: bool) -> tuple[int, str, GoldenResult | None, GateReport, CommonUnseen]:
    result, gate, _ = train_head_on(client, spec, trunk, tv, workspace=workspace, batch_size=batch_size,
                                    num_workers=num_workers, device=device, progress=progress, data=data, run=run)
    head = LoadedHead(result.module, result.meta())
    golden = _golden(spec, trunk, head, device, batch_size)
    unseen = scorer.score(spec, data, trunk, head)
    heldout = scorer.heldout(spec, trunk, head)
    # The same flattening MLflow gets, so the contract reads what a resumed cascade will read.
    contract = check_contract(production_metrics, head_run_metrics(result), tolerances=tolerances,
                              own_gate_passed=gate.passed, golden=golden, unseen=unseen, heldout=heldout)
    extra = {} if golden is None else {"golden_total": golden.total, "golden_wrong": len(golden.wrong)}
    extra.update(_unseen_metrics(unseen))
    if heldout is not None and heldout.candidate_accuracy is not None:
        extra.update(heldout_accuracy=heldout.candidate_accuracy, heldout_images=float(heldout.images))
    version = register_head(client, result, trunk_version=tv, gate_report=gate,
                            tags={CASCADE_TAG: cid, "contract": "passed" if contract.passed else "failed"},
                            metrics=extra,
                            artifacts={"contract.txt": contract.format(f"{model_name(spec.name)} on trunk v{tv} "
                                                                       f"vs production") + "\n"},
                            run=run)
    return version, "trained", golden, contract, unseen


BACKENDS = ("serial", "process", "ray")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _count(field_name: str, value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field '{field_name}': '{value}' is not 'auto' or a count of at least 1")
    return value


@dataclass(frozen=True)
class Parallel:
    """How the cascade spreads its heads (``parallel`` in ``conf/refresh.yaml``).

    Attributes:
        backend: ``serial`` (one head after another, in this process), ``process`` (a
            pool of worker processes on this machine) or ``ray`` (one Ray task per head).
        workers: ``process``: the pool's size, ``auto`` = the cores this process may use
            (never more than there are heads); ``ray``: the most heads in flight at once,
            ``auto`` = no cap (Ray schedules them by ``threads`` CPUs each).
        threads: torch intra-op threads per worker, ``auto`` = cores // workers (at least
            1) for ``process`` and 1 for ``ray``, where it is also each task's ``num_cpus``.
        address: ``ray`` only: None starts a private Ray on this machine (stopped at the
            end), ``auto`` joins the cluster this machine is part of, ``ray://<head>:10001``
            a remote one (:func:`heads.classify.ray_backend` connects alike). On a cluster
            the tracking URI must be a server and the workspace a shared mount.
    """

    backend: str = "serial"
    workers: int | str = "auto"
    threads: int | str = "auto"
    address: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"field 'parallel.backend': '{self.backend}' is not one of: {', '.join(BACKENDS)}")
        _count("parallel.workers", self.workers)
        _count("parallel.threads", self.threads)

    def pool_size(self, n_heads: int) -> int:
        """Worker processes (``process``) or heads in flight (``ray``) for ``n_heads`` heads."""
        if self.workers != "auto":
            return max(1, min(int(self.workers), n_heads))
        return max(1, min(available_cores() if self.backend == "process" else n_heads, n_heads))

    def torch_threads(self, workers: int) -> int:
        if self.threads != "auto":
            return int(self.threads)
        return max(1, available_cores() // workers) if self.backend == "process" else 1


@dataclass(frozen=True)
class HeadSettings:
    """What every head's retraining and checks take besides the head and the trunk (plain data).

    Attributes:
        tolerances: platform defaults of the contract; a head's gate block overrides them.
        batch_size, num_workers, device, progress: as for head training.
    """

    tolerances: Tolerances
    batch_size: int
    num_workers: int
    device: str
    progress: bool


@dataclass(frozen=True)
class HeadTask:
    """One head's work for a worker: only plain data, so it can cross to another process or machine.

    Attributes:
        tracking_uri: the registry the worker opens its own ``MlflowClient`` on.
        workspace: the workspace folder (feature cache, run folders).
        name: the head.
        production: the release the cascade started from (its head versions and trunk).
        candidate_version: the candidate ``trunk`` version the worker loads.
        cascade_id: the cascade's id (tag of every head version it trains).
        settings: training and contract settings.
        threads: torch intra-op threads for the worker.
    """

    tracking_uri: str
    workspace: str
    name: str
    production: Release
    candidate_version: int
    cascade_id: str
    settings: HeadSettings
    threads: int


def _head_outcome(client: MlflowClient, workspace: Workspace, name: str, production: Release, trunk: Trunk,
                  tv: int, cid: str, scorer: CommonUnseenScorer, settings: HeadSettings) -> HeadOutcome:
    """One production head retrained on the candidate, evaluated, golden set run and contract checked."""
    pv = production.heads[name]
    prod_metrics = head_metrics(client, name, pv)
    try:
        spec = stored_spec(client, name, pv, {"workspace": str(workspace.root)})
        tol = Tolerances.for_head(spec.gate, settings.tolerances)
        version, status, golden, contract, unseen = _retrain(
            client, spec, trunk, tv, cid, workspace=workspace, production_metrics=prod_metrics, tolerances=tol,
            scorer=scorer, batch_size=settings.batch_size, num_workers=settings.num_workers, device=settings.device,
            progress=settings.progress)
        return HeadOutcome(name, pv, version, status, contract, prod_metrics, head_metrics(client, name, version),
                           golden, unseen=unseen)
    except HEAD_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("%s: retraining on trunk v%s failed: %s", model_name(name), tv, reason)
        return HeadOutcome(name, pv, None, "failed",
                           check_contract(prod_metrics, None, tolerances=settings.tolerances, missing_reason=reason),
                           prod_metrics, reason=reason)


def outcome_json(outcome: HeadOutcome) -> str:
    """A head's outcome as JSON (what a worker sends back; floats round-trip exactly)."""
    return json.dumps(asdict(outcome))


def outcome_from_json(text: str) -> HeadOutcome:
    """The inverse of :func:`outcome_json`."""
    d = json.loads(text)
    contract = d.pop("contract")
    golden, unseen = d.pop("golden"), d.pop("unseen")
    return HeadOutcome(
        **d, contract=GateReport(contract["passed"], [Check(**c) for c in contract["checks"]]),
        golden=None if golden is None else GoldenResult(golden["source"], golden["total"],
                                                        [tuple(w) for w in golden["wrong"]]),
        unseen=None if unseen is None else CommonUnseen(**unseen))


# One worker's registry, candidate trunk and scorer, kept across the heads it is given (a Ray
# worker may serve several cascades: the key says which one they belong to).
_WORKER: dict[str, Any] = {}


def _worker_state(task: HeadTask) -> tuple[MlflowClient, Workspace, Trunk, CommonUnseenScorer]:
    key = (task.tracking_uri, task.workspace, task.production.version, task.candidate_version, task.settings)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        workspace = Workspace.at(task.workspace)
        client = connect(workspace.root, task.tracking_uri)
        s = task.settings
        scorer = CommonUnseenScorer.for_cascade(client, workspace, task.production, task.candidate_version,
                                                batch_size=s.batch_size, num_workers=s.num_workers, device=s.device)
        _WORKER.update(key=key, state=(client, workspace, load_trunk(client, task.candidate_version), scorer))
    return _WORKER["state"]


def retrain_head(task: HeadTask) -> str:
    """A worker's entry point: one head retrained and checked on the candidate; its outcome as JSON.

    Opens its own registry client and loads the candidate trunk itself (once per worker).
    """
    torch.set_num_threads(task.threads)
    client, workspace, trunk, scorer = _worker_state(task)
    return outcome_json(_head_outcome(client, workspace, task.name, task.production, trunk, task.candidate_version,
                                      task.cascade_id, scorer, task.settings))


def _end_with_parent(parent: int) -> None:
    # A worker of a killed cascade stops too (its head unregistered, as in a killed serial
    # cascade), rather than racing the rerun that resumes the cascade.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cascade-parent-watch").start()


def _pool_worker_init(parent: int) -> None:
    from registry.store.tracking import quiet_libraries

    quiet_libraries()
    _end_with_parent(parent)


def _run_process_pool(tasks: list[HeadTask], workers: int, done: Callable[[HeadOutcome], None]) -> None:
    # spawn, not fork: a forked child of a process that has run torch (its thread pools,
    # OpenMP state) can hang or crash.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_pool_worker_init,
                               initargs=(os.getpid(),))
    try:
        pending = {pool.submit(retrain_head, t) for t in tasks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                done(outcome_from_json(f.result()))
    except BrokenProcessPool as e:
        raise CascadeError(f"a cascade worker process died ({e}); run the cascade again to resume: the heads "
                           f"that finished are reused") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(tasks: list[HeadTask], parallel: Parallel, in_flight: int, done: Callable[[HeadOutcome], None]) -> None:
    import ray

    from heads.classify.ray_backend import connect_ray

    started = connect_ray(parallel.address)
    try:
        remote = ray.remote(retrain_head)
        queue, pending = list(tasks), []
        while queue or pending:
            while queue and len(pending) < in_flight:
                task = queue.pop(0)
                pending.append(remote.options(num_cpus=task.threads).remote(task))
            finished, pending = ray.wait(pending, num_returns=1)
            done(outcome_from_json(ray.get(finished[0])))
    finally:
        if started:
            ray.shutdown()


def prefetch_features(client: MlflowClient, workspace: Workspace, trunk: Trunk, tv: int, production: Release,
                      settings: HeadSettings) -> int:
    """Extract the candidate's features for every production head's images, once per tap; rows computed.

    Parallel workers then find them in the cache, instead of several computing the same
    rows at once (which the cache tolerates, but which wastes the trunk passes). A head
    whose config or data cannot be read is skipped here: its own worker reports why.
    """
    avoid = trunk_trained_on(client, tv)
    by_tap: dict[str, dict[str, None]] = {}
    context = {"workspace": str(workspace.root)}
    for name, pv in sorted(production.heads.items()):
        try:
            spec = stored_spec(client, name, pv, context)
            data = load_labelled_data(spec, avoid=avoid, hashes=workspace.content_hashes())
        except HEAD_ERRORS:
            continue
        if spec.tap in trunk.taps:
            by_tap.setdefault(spec.tap, {}).update(dict.fromkeys(s.path for s in data.train + data.val))
    rows = 0
    for tap, paths in sorted(by_tap.items()):
        got = extract_job(trunk, list(paths), workspace=workspace, taps=(tap,), batch_size=settings.batch_size,
                          num_workers=settings.num_workers, device=settings.device, progress=settings.progress)
        rows += int(got.summary.get("new_rows", 0))
    return rows


def run_cascade(client: MlflowClient, workspace: Workspace, *, candidate: str | int = CANDIDATE,
                tolerances: Tolerances = Tolerances(), batch_size: int = 64, num_workers: int = 0,
                device: str = "cpu", progress: bool = True, promote: bool = True,
                parallel: Parallel = Parallel(), echo: Callable[[str], None] | None = None) -> CascadeResult:
    """Retrain and gate every production head on a candidate trunk; promote everything or nothing.

    Args:
        client: the registry.
        workspace: feature cache and run folders.
        candidate: ``candidate`` (the trunk alias) or a ``trunk`` version.
        tolerances: platform defaults; each head's ``gate`` block may override them.
        batch_size, num_workers, device, progress: as for head training (workers of a
            parallel cascade train without progress bars).
        promote: move production when every head passes (False: gate and report only).
        parallel: serial, a process pool or Ray tasks (:class:`Parallel`); the outcomes and
            the promotion are the same.
        echo: also receives each step's line (every line is logged); the tool passes ``print``.

    Returns:
        The outcome per head, the promotion (or why not) and the report's locations.

    Raises:
        CascadeError: no production release, no candidate, the candidate already serves,
            or a worker process died (rerun to resume).
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
    settings = HeadSettings(tolerances, batch_size, num_workers, device, progress)
    scorer = CommonUnseenScorer.for_cascade(client, workspace, production, tv, batch_size=batch_size,
                                            num_workers=num_workers, device=device)
    if scorer.excluded is None:
        say(f"  validation images neither trunk trained on: unknown ({scorer.note}); heads are compared on "
            f"their full validation split")
    names = sorted(production.heads)
    start = time.perf_counter()

    def finished(outcome: HeadOutcome) -> None:
        result.outcomes[outcome.name] = outcome
        got = "-" if outcome.candidate_version is None else f"v{outcome.candidate_version}"
        compared = "" if outcome.unseen is None else f"{outcome.unseen.describe()}; "
        say(f"  [{len(result.outcomes)}/{len(names)}] {outcome.name}: v{outcome.production_version} -> {got} "
            f"({outcome.status}) {compared}{'PASS' if outcome.passed else 'FAIL: ' + outcome.blocking()}")

    if parallel.backend == "serial" or not names:
        for name in names:
            finished(_head_outcome(client, workspace, name, production, trunk, tv, cid, scorer, settings))
    else:
        workers = parallel.pool_size(len(names))
        threads = parallel.torch_threads(workers)
        rows = prefetch_features(client, workspace, trunk, tv, production, settings)
        say(f"  candidate features extracted once for every head ({rows} new rows); {len(names)} heads on "
            f"{workers} {'worker processes' if parallel.backend == 'process' else 'Ray tasks at a time'}, "
            f"{threads} torch thread{'s' if threads > 1 else ''} each")
        worker_settings = HeadSettings(tolerances, batch_size, num_workers, device, progress=False)
        tasks = [HeadTask(client_uri(client), str(workspace.root), n, production, tv, cid, worker_settings, threads)
                 for n in names]
        if parallel.backend == "process":
            _run_process_pool(tasks, workers, finished)
        else:
            _run_ray(tasks, parallel, workers, finished)
    result.outcomes = {n: result.outcomes[n] for n in names}  # by name, however they finished
    say(f"  {len(names)} heads in {time.perf_counter() - start:.1f} s ({parallel.backend})")
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
