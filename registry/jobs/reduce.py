"""Compute reduction, automatic: build a small space of cheaper trunks, cascade each, keep the cheapest that passes.

A platform owner gives a space of reductions (quantization schemes of the production
trunk, distilled students, students quantized in turn); :func:`search_reductions`
builds each as a ``trunk`` version like any other (each builder is a refresh candidate
and is reused when its recipe matches one built before), runs the refresh cascade on it
with ``promote=False`` (every production head retrained on it from its own stored config
and gated by its own contract; heads already retrained on the same trunk_id from the same
recipe are reused, and so are cached features), then times every candidate beside the
production trunk on the same batches, interleaved, in one run. The cheapest candidate
that passes every head's contract is chosen; with ``promote`` it reaches production
through the cascade again (which reuses every head it just trained and only promotes),
otherwise it is proposed. A candidate that cannot be built (a scheme a family does not
support, say) is reported with its one-line reason and the search goes on.

"Accuracy kept" is a head's candidate val accuracy over its production val accuracy (the
cascade report's ``kept`` column); the worst head's figure is the candidate's. The Pareto
front is the set of candidates no other candidate beats on both cost and worst-head
accuracy kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.contract import Tolerances
from registry.jobs.cascade import CascadeError, CascadeResult, Parallel, run_cascade
from registry.jobs.refresh import Candidate
from registry.reports.summary import narrator
from registry.store.releases import PRODUCTION, Release, get_release
from registry.store.trunks import load_trunk
from registry.store.workspace import Workspace
from trunk.model import Trunk, TrunkError
from trunk.speed import measure_trunks

log = logging.getLogger(__name__)

# What "cheapest" can mean: measured time per image on this machine, or counted GFLOPs.
COSTS = ("ms", "gflops", "bytes")
PRODUCTION_ROW = "production"


@dataclass
class Reduction:
    """One point of the search space.

    Attributes:
        name: how the report names it (``int8-static``, ``student-half``, ``student-half+int8-static``).
        build: builds (or reuses) the candidate and registers it; raises ``TrunkError`` /
            ``ValueError`` with a one-line reason when this reduction does not apply.
        recipe: what it is, for the report and the MLflow run (``{"student": ..., "scheme": ...}``).
    """

    name: str
    build: Callable[[], Candidate]
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReducedTrunk:
    """One candidate's figures.

    Attributes:
        name, recipe: from its :class:`Reduction`.
        version, trunk_id, status: the registered ``trunk`` version (None when it could not be built).
        error: why it could not be built or cascaded ('' otherwise).
        cost: ``ms_per_image`` (median, with ``_q1``/``_q3``), ``gflops``, ``params``,
            ``bytes`` (serving weights), ``speedup`` (production time / this one's, same batches).
        kept: accuracy kept per head (candidate val accuracy / production's).
        passed: every head passed its contract.
        blocked: the heads that did not, with why.
        cascade_id, report: the cascade that gated it and its report's Markdown path.
    """

    name: str
    recipe: dict[str, Any]
    version: int | None = None
    trunk_id: str | None = None
    status: str = ""
    error: str = ""
    cost: dict[str, float] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    blocked: dict[str, str] = field(default_factory=dict)
    cascade_id: str = ""
    report: str = ""

    @property
    def worst(self) -> tuple[str, float] | None:
        """The head that keeps the least accuracy, and how much; None without figures."""
        if not self.kept:
            return None
        name = min(self.kept, key=lambda n: (self.kept[n], n))
        return name, self.kept[name]

    @property
    def verdict(self) -> str:
        if self.error:
            return "not built" if self.version is None else "failed"
        return "passes" if self.passed else "blocked"


@dataclass
class SearchResult:
    """What a search did.

    Attributes:
        production: the release production pointed at when the search began.
        baseline: the production trunk's cost, measured in the same run as the candidates'.
        rows: one per reduction, in the order searched.
        cost_key: what "cheapest" meant (:data:`COSTS`).
        chosen: the cheapest candidate that passes (None: none passes).
        front: names on the Pareto front of cost vs worst-head accuracy kept.
        promoted: the new production release when the chosen trunk was promoted.
        refused: why promotion was refused, when it was.
        report: paths and run id of the report (:mod:`registry.reports.reduce`).
    """

    production: Release
    baseline: dict[str, float]
    rows: list[ReducedTrunk]
    cost_key: str
    chosen: str | None = None
    front: list[str] = field(default_factory=list)
    promoted: Release | None = None
    refused: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> ReducedTrunk:
        return next(r for r in self.rows if r.name == name)


def cost_value(cost: dict[str, float], cost_key: str) -> float:
    """The figure "cheapest" compares (:data:`COSTS`)."""
    return {"ms": cost.get("ms_per_image"), "gflops": cost.get("gflops"), "bytes": cost.get("bytes")}[cost_key] \
        or float("inf")


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point dominates: ``(name, cost, kept)``, lower cost and higher kept better.

    A point is dominated when another costs no more and keeps no less, and is strictly
    better on one of the two. Returned cheapest first.
    """
    front = []
    for name, cost, kept in points:
        dominated = any(c <= cost and k >= kept and (c < cost or k > kept) for n, c, k in points if n != name)
        if not dominated:
            front.append((cost, -kept, name))
    return [name for _, _, name in sorted(front)]


def _kept(result: CascadeResult) -> dict[str, float]:
    out = {}
    for name, o in result.outcomes.items():
        pa = o.production_metrics.get("val_accuracy")
        ca = (o.candidate_metrics or {}).get("val_accuracy")
        out[name] = 0.0 if ca is None or not pa else ca / pa
    return out


def _costs(production: Trunk, rows: Sequence[ReducedTrunk], trunks: dict[str, Trunk], *, device: str,
           batch_size: int) -> dict[str, float]:
    """Time every built candidate beside production on the same batch, in one run; fill each row's cost."""
    size = list(production.data_config["input_size"])
    same = {n: t for n, t in trunks.items() if list(t.data_config["input_size"]) == size}
    pixels = torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0))
    measured = measure_trunks({PRODUCTION_ROW: production, **same}, pixels, device=device)
    base = measured[PRODUCTION_ROW]
    for r in rows:
        if r.name in measured:
            c = measured[r.name]
            r.cost = {**c, "speedup": base["ms_per_image"] / c["ms_per_image"] if c["ms_per_image"] > 0 else
                      float("inf")}
    return base


def search_reductions(client: MlflowClient, workspace: Workspace, reductions: Sequence[Reduction], *,
                      tolerances: Tolerances = Tolerances(), promote: bool = True, cost_key: str = "ms",
                      batch_size: int = 64, num_workers: int = 0, device: str = "cpu", progress: bool = True,
                      parallel: Parallel = Parallel(), timing_batch: int = 32,
                      echo: Callable[[str], None] | None = None) -> SearchResult:
    """Build, cascade and time every reduction; choose (and with ``promote`` promote) the cheapest that passes.

    Args:
        reductions: the space, in the order to search (names must be unique).
        tolerances, batch_size, num_workers, device, progress, parallel: as for :func:`run_cascade`.
        promote: promote the chosen trunk through the cascade; False: propose it only.
        cost_key: ``ms`` (measured here), ``gflops`` or ``bytes``.
        timing_batch: images per timed batch.
        echo: also receives each line (the tool passes ``print``).

    Raises:
        CascadeError: no production release with heads.
        ValueError: an unknown cost, duplicate names, or an empty space.
    """
    from registry.reports.reduce import log_reduce_report

    if cost_key not in COSTS:
        raise ValueError(f"field 'cost': '{cost_key}' is not one of {', '.join(COSTS)}")
    names = [r.name for r in reductions]
    if not names:
        raise ValueError("field 'space': the search space is empty; name at least one scheme or student")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"field 'space': {', '.join(dup)} appears more than once")
    production = get_release(client, PRODUCTION)
    if production is None or not production.heads:
        raise CascadeError("there is no production release with heads, so there is nothing to reduce")
    say = narrator(log, echo)
    prod_trunk = load_trunk(client, production.trunk_version)
    say(f"reduction search: {len(reductions)} candidates against release v{production.version} (trunk "
        f"v{production.trunk_version}, {prod_trunk.model_name}, {len(production.heads)} heads)")
    rows: list[ReducedTrunk] = []
    trunks: dict[str, Trunk] = {}
    for i, reduction in enumerate(reductions, 1):
        row = ReducedTrunk(reduction.name, dict(reduction.recipe))
        rows.append(row)
        say(f"[{i}/{len(reductions)}] {reduction.name}: building")
        try:
            built = reduction.build()
        except (TrunkError, ValueError, CascadeError) as e:
            row.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            say(f"[{i}/{len(reductions)}] {reduction.name}: not built: {row.error}")
            continue
        row.version, row.trunk_id, row.status = built.version, built.trunk.trunk_id, built.status
        if built.trunk.trunk_id == prod_trunk.trunk_id:
            row.error = f"trunk v{built.version} has production's trunk_id {prod_trunk.trunk_id}: nothing to gain"
            continue
        try:
            cascade = run_cascade(client, workspace, candidate=built.version, tolerances=tolerances,
                                  batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                                  promote=False, parallel=parallel, echo=echo)
        except CascadeError as e:
            row.error = str(e).splitlines()[0]
            say(f"[{i}/{len(reductions)}] {reduction.name}: cascade failed: {row.error}")
            continue
        trunks[reduction.name] = built.trunk
        row.kept, row.passed, row.cascade_id = _kept(cascade), cascade.passed, cascade.cascade_id
        row.blocked = {n: o.blocking() for n, o in cascade.outcomes.items() if not o.passed}
        row.report = str(cascade.report.get("markdown", ""))
        worst = row.worst
        say(f"[{i}/{len(reductions)}] {reduction.name}: trunk v{row.version} ({row.status}), "
            f"{'passes every contract' if row.passed else 'blocked by ' + ', '.join(sorted(row.blocked))}"
            + (f"; worst head {worst[0]} keeps {worst[1]:.1%}" if worst else ""))
    say(f"timing production and {len(trunks)} candidates on the same batches, interleaved")
    baseline = _costs(prod_trunk, rows, trunks, device=device, batch_size=timing_batch)
    result = SearchResult(production, baseline, rows, cost_key)
    costed = [r for r in rows if r.cost and r.worst is not None]
    result.front = pareto_front([(r.name, cost_value(r.cost, cost_key), r.worst[1]) for r in costed])
    passing = [r for r in costed if r.passed and cost_value(r.cost, cost_key) < cost_value(baseline, cost_key)]
    if passing:
        result.chosen = min(passing, key=lambda r: (cost_value(r.cost, cost_key), r.name)).name
    if result.chosen is not None and promote:
        chosen = result.row(result.chosen)
        say(f"promoting {chosen.name} (trunk v{chosen.version}) through the cascade")
        final = run_cascade(client, workspace, candidate=chosen.version, tolerances=tolerances, batch_size=batch_size,
                            num_workers=num_workers, device=device, progress=progress, promote=True,
                            parallel=parallel, echo=echo)
        result.promoted, result.refused = final.promoted, final.refused
        if final.promoted is None and not final.refused:
            result.refused = f"the cascade's verdict changed: {final.verdict}"
    result.report = log_reduce_report(client, workspace, result)
    return result
