"""The gate a head must pass to enter a release: accuracy floors and cost ceilings.

The gate is a head config's ``gate`` block (:class:`heads.spec.GateConfig`). Checking it
is pure arithmetic on the head's metrics, so it lives here, away from MLflow; the
registry records the verdict and refuses heads that failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GATE_KEYS = ("min_val_accuracy", "max_added_gflops", "max_added_ms_per_image",
             "min_slice_accuracy", "min_slice_size")
# The refresh cascade's contract (heads.checks.contract) reads these; the gate itself ignores them.
CONTRACT_KEYS = ("tolerance", "slice_tolerance", "golden")


@dataclass(frozen=True)
class Check:
    """One line of the gate.

    Attributes:
        name: what is checked (a metric name, or ``slice_accuracy.<slice>``).
        value: the head's figure; None when the metric is missing.
        limit: the gate's floor or ceiling.
        passed: whether the figure is on the right side of the limit.
        op: ``>=`` for floors, ``<=`` for ceilings.
        note: why a check was skipped or failed beyond the numbers.
    """

    name: str
    value: float | None
    limit: float
    passed: bool
    op: str = ">="
    note: str = ""


@dataclass
class GateReport:
    """The verdict of a gate: passed only when every check passed.

    Attributes:
        passed: all checks passed.
        checks: every check, in gate order.
    """

    passed: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def format(self, title: str = "gate") -> str:
        """A readable multi-line report, one line per check.

        Args:
            title: what the gate is for, e.g. ``head.colour v3``.
        """
        n_ok = sum(c.passed for c in self.checks)
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"{title}: {verdict} ({n_ok}/{len(self.checks)} checks passed)"]
        width = max((len(c.name) for c in self.checks), default=0)
        for c in self.checks:
            mark = "ok  " if c.passed else "FAIL"
            value = "missing" if c.value is None else _fmt(c.value)
            line = f"  [{mark}] {c.name:<{width}}  {value} {c.op} {_fmt(c.limit)}"
            lines.append(line + (f"  ({c.note})" if c.note else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed,
                "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "op": c.op,
                            "passed": c.passed, "note": c.note} for c in self.checks]}


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _compare(name: str, value: Any, limit: float, op: str, note: str = "") -> Check:
    v = _number(value)
    if v is None:
        return Check(name, None, float(limit), False, op, "; ".join(filter(None, ["metric missing", note])))
    ok = v >= limit if op == ">=" else v <= limit
    return Check(name, v, float(limit), ok, op, note)


def _slice_figures(slice_accuracy: Mapping[str, Any], slice_sizes: Mapping[str, int] | None
                   ) -> dict[str, tuple[Any, int | None]]:
    # HeadResult stores {slice: {"accuracy": a, "n": n}}; plain {slice: a} is accepted too.
    out: dict[str, tuple[Any, int | None]] = {}
    for name, entry in slice_accuracy.items():
        if isinstance(entry, Mapping):
            acc, n = entry.get("accuracy"), entry.get("n")
        else:
            acc, n = entry, None
        if slice_sizes is not None and name in slice_sizes:
            n = slice_sizes[name]
        out[str(name)] = (acc, None if n is None else int(n))
    return out


def check_gate(spec_gate: Mapping[str, Any], metrics: Mapping[str, Any],
               slice_accuracy: Mapping[str, Any] | None = None,
               slice_sizes: Mapping[str, int] | None = None) -> GateReport:
    """Check a head's figures against its gate.

    Args:
        spec_gate: the head config's ``gate`` block (keys of ``GATE_KEYS``; None disables
            a limit).
        metrics: the head's metrics (``val_accuracy``, ``added_gflops``, ``added_ms_per_image``).
        slice_accuracy: ``{slice: accuracy}`` or ``{slice: {"accuracy": a, "n": n}}``.
        slice_sizes: ``{slice: validation examples}``; overrides ``n`` above. Slices
            smaller than ``min_slice_size`` are reported but not held to the floor,
            because their accuracy is mostly noise. A slice of unknown size is checked.

    Returns:
        A :class:`GateReport`; a missing metric fails its check rather than passing it.

    Raises:
        ValueError: the gate has a key this function does not know (a typo would
            otherwise silently disable a limit).
    """
    unknown = sorted(set(spec_gate) - set(GATE_KEYS) - set(CONTRACT_KEYS))
    if unknown:
        raise ValueError(f"gate: unknown field(s) {', '.join(unknown)}; valid: {', '.join(GATE_KEYS + CONTRACT_KEYS)}")
    checks: list[Check] = []
    floor = spec_gate.get("min_val_accuracy")
    checks.append(_compare("val_accuracy", metrics.get("val_accuracy"), float(floor or 0.0), ">="))
    for key, metric in (("max_added_gflops", "added_gflops"), ("max_added_ms_per_image", "added_ms_per_image")):
        if spec_gate.get(key) is not None:
            checks.append(_compare(metric, metrics.get(metric), float(spec_gate[key]), "<="))
    slice_floor = spec_gate.get("min_slice_accuracy")
    if slice_floor is not None:
        min_size = int(spec_gate.get("min_slice_size") or 0)
        for name, (acc, n) in sorted(_slice_figures(slice_accuracy or {}, slice_sizes).items()):
            check_name = f"slice_accuracy.{name}"
            if n is not None and n < min_size:
                v = _number(acc)
                checks.append(Check(check_name, v, float(slice_floor), True, ">=",
                                    f"n={n} < min_slice_size {min_size}, not held to the floor"))
            else:
                checks.append(_compare(check_name, acc, float(slice_floor), ">=",
                                       f"n={n}" if n is not None else ""))
    return GateReport(passed=all(c.passed for c in checks), checks=checks)
