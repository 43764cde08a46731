"""The refresh cascade's model contract: a retrained head may not regress against production.

When the trunk is refreshed every production head is retrained on the candidate. The new
version must pass its own gate (:mod:`heads.checks.gate`) and, against the production version:

- overall validation accuracy at least production's minus ``tolerance``, held on the
  *common unseen subset* when it is big enough (see below);
- every slice that has at least ``min_slice_size`` validation examples in production at
  least production's slice accuracy minus ``slice_tolerance``; a slice that production
  had and the candidate lacks fails (the validation data changed under the head);
- every image of the head's golden set (:mod:`heads.checks.golden`) still gets its required label;
- when the head config names a held-out set (``data.heldout``, :mod:`heads.checks.heldout`):
  the candidate's accuracy on it at least production's (the production head on the
  production trunk, same images) minus ``tolerance``.

Which accuracy is held. A validation image either trunk trained on flatters that trunk's
head, so the cascade scores the production head (on the production trunk) and the
candidate head (on the candidate) on the same *common unseen subset*: the head's
validation images in neither trunk's record of its training images
(:class:`CommonUnseen`). The rule:

- both trunks have a record and the subset has at least ``min_slice_size`` images: the
  accuracy check is ``val_accuracy_unseen`` on that subset (candidate at least
  production minus ``tolerance``); the full split's ``val_accuracy`` stays in the report
  as a figure, not held;
- the subset is smaller than ``min_slice_size`` (a figure on a handful of images is
  noise), or a trunk has no record (``unknown``): ``val_accuracy`` on the full split is
  held, as before, and the check's note says why.

Slices and the golden set are checked as before, on the full split.

A head with no candidate version at all (its retraining failed) fails too. Everything
here is arithmetic on flat metric dicts as MLflow stores them (``val_accuracy``,
``slice_accuracy.<slice>``, ``slice_size.<slice>``), so a resumed cascade re-checks a head
from its registered figures without retraining it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from heads.checks.gate import Check, GateReport

SLICE_ACC = "slice_accuracy."
SLICE_SIZE = "slice_size."
# Platform defaults; a head's gate block overrides them (conf/refresh.yaml sets the platform's).
DEFAULT_TOLERANCE = 0.01
DEFAULT_SLICE_TOLERANCE = 0.03


@dataclass(frozen=True)
class Tolerances:
    """How far a retrained head may fall below production.

    Attributes:
        tolerance: allowed drop of overall ``val_accuracy``.
        slice_tolerance: allowed drop of each held slice's accuracy.
        min_slice_size: slices with fewer production validation examples are reported
            but not held (their accuracy is mostly noise).
    """

    tolerance: float = DEFAULT_TOLERANCE
    slice_tolerance: float = DEFAULT_SLICE_TOLERANCE
    min_slice_size: int = 20

    @classmethod
    def for_head(cls, gate: Mapping[str, object], defaults: "Tolerances") -> "Tolerances":
        """The head's own tolerances where its ``gate`` block sets them, else ``defaults``."""

        def pick(key: str, fallback: float) -> float:
            value = gate.get(key)
            return fallback if value is None else float(value)  # type: ignore[arg-type]

        size = gate.get("min_slice_size")
        return cls(pick("tolerance", defaults.tolerance), pick("slice_tolerance", defaults.slice_tolerance),
                   defaults.min_slice_size if size is None else int(size))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CommonUnseen:
    """Production and candidate scored on the validation images neither trunk trained on.

    Attributes:
        images: how many images the subset holds; None when a trunk has no record of its
            training images (unknown), so no subset could be formed.
        production_accuracy: the production head's accuracy on them (None when ``images`` is 0 or None).
        candidate_accuracy: the candidate head's accuracy on them.
        note: why it is unknown (which trunk has no record).
    """

    images: int | None
    production_accuracy: float | None = None
    candidate_accuracy: float | None = None
    note: str = ""

    def describe(self) -> str:
        """A few words for the cascade's per-head line."""
        if self.images is None:
            return f"unseen subset unknown ({self.note}): compared on the full split"
        return f"compared on {self.images} val images neither trunk trained on"


@dataclass
class HeldoutPair:
    """Production and candidate scored on the held-out set the head config names (``data.heldout``).

    Attributes:
        source: the held-out file.
        images: labelled images scored (decoded) on the candidate.
        production_accuracy: the production head on the production trunk (None: nothing scored).
        candidate_accuracy: the retrained head on the candidate trunk.
    """

    source: str
    images: int
    production_accuracy: float | None
    candidate_accuracy: float | None


@dataclass
class GoldenResult:
    """A head's golden set run through the candidate.

    Attributes:
        source: the golden file.
        total: images in it.
        wrong: ``(path, required label, what came out)`` per image that did not get its
            label; "what came out" is the predicted label or the decoding error.
    """

    source: str
    total: int
    wrong: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return self.total - len(self.wrong)


def slices(metrics: Mapping[str, float]) -> dict[str, tuple[float, int | None]]:
    """``{slice: (accuracy, n)}`` from a flat metric dict."""
    out: dict[str, tuple[float, int | None]] = {}
    for key, value in metrics.items():
        if key.startswith(SLICE_ACC):
            name = key[len(SLICE_ACC):]
            n = metrics.get(SLICE_SIZE + name)
            out[name] = (float(value), None if n is None else int(n))
    return out


def worst_slice(metrics: Mapping[str, float], min_size: int = 0) -> tuple[str, float] | None:
    """The slice with the lowest accuracy among those with at least ``min_size`` examples."""
    held = [(acc, name) for name, (acc, n) in slices(metrics).items() if n is None or n >= min_size]
    if not held:
        return None
    acc, name = min(held)
    return name, acc


def check_contract(production: Mapping[str, float], candidate: Mapping[str, float] | None, *,
                   tolerances: Tolerances, own_gate_passed: bool | None = True,
                   golden: GoldenResult | None = None, missing_reason: str = "",
                   unseen: CommonUnseen | None = None, heldout: HeldoutPair | None = None) -> GateReport:
    """Check a retrained head against its production version.

    Args:
        production: the production version's run metrics.
        candidate: the retrained version's run metrics; None when there is no retrained
            version (its training failed), which fails the contract.
        tolerances: this head's tolerances (:meth:`Tolerances.for_head`).
        own_gate_passed: the verdict of the head's own gate on the candidate.
        golden: the golden set's result on the candidate; None when the head has none.
        missing_reason: why there is no candidate (shown when ``candidate`` is None).
        unseen: both heads scored on the common unseen subset; None: not formed (the
            full split is held, as when it is unknown). See the module docstring's rule.
        heldout: both heads on the head's own held-out set (``data.heldout``); None when
            it names none. The candidate's ``heldout_accuracy`` may fall at most
            ``tolerance`` below production's on the same images.

    Returns:
        A :class:`GateReport`; ``passed`` only when every check passed.
    """
    if candidate is None:
        return GateReport(False, [Check("head", None, 0.0, False, note=f"no retrained version: "
                                                                        f"{missing_reason or 'missing'}")])
    checks = [Check("own gate", 1.0 if own_gate_passed else 0.0, 1.0, bool(own_gate_passed),
                    note="" if own_gate_passed else "the head's own gate failed (see its gate.txt)")]
    held_on_unseen = (unseen is not None and unseen.images is not None
                      and unseen.images >= tolerances.min_slice_size and unseen.images > 0)
    if held_on_unseen:
        limit = float(unseen.production_accuracy) - tolerances.tolerance
        got = float(unseen.candidate_accuracy)
        checks.append(Check("val_accuracy_unseen", got, limit, got >= limit,
                            note=f"production {float(unseen.production_accuracy):.4g} - tolerance "
                                 f"{tolerances.tolerance:g}, on the {unseen.images} val images neither trunk "
                                 f"trained on"))
    if unseen is None or unseen.images is None:
        why = "" if unseen is None else f"; unseen subset unknown ({unseen.note}): held on the full split"
    elif not held_on_unseen:
        why = (f"; only {unseen.images} val images neither trunk trained on (< min_slice_size "
               f"{tolerances.min_slice_size}): held on the full split")
    else:
        why = ""
    prod_acc, cand_acc = production.get("val_accuracy"), candidate.get("val_accuracy")
    if held_on_unseen:
        limit = float(prod_acc) - tolerances.tolerance if prod_acc is not None else 0.0
        checks.append(Check("val_accuracy", None if cand_acc is None else float(cand_acc), limit, True,
                            note="full split, reported, not held (val_accuracy_unseen is held)"))
    elif prod_acc is None:
        checks.append(Check("val_accuracy", cand_acc, 0.0, False, note="production version has no val_accuracy"))
    else:
        limit = float(prod_acc) - tolerances.tolerance
        ok = cand_acc is not None and float(cand_acc) >= limit
        checks.append(Check("val_accuracy", None if cand_acc is None else float(cand_acc), limit, ok,
                            note=f"production {float(prod_acc):.4g} - tolerance {tolerances.tolerance:g}"
                                 + ("" if cand_acc is not None else "; metric missing") + why))
    cand_slices = slices(candidate)
    for name, (acc, n) in sorted(slices(production).items()):
        key = f"slice_accuracy.{name}"
        if n is not None and n < tolerances.min_slice_size:
            got = cand_slices.get(name, (None, None))[0]
            checks.append(Check(key, got, acc - tolerances.slice_tolerance, True,
                                note=f"n={n} < min_slice_size {tolerances.min_slice_size}, not held"))
            continue
        if name not in cand_slices:
            checks.append(Check(key, None, acc - tolerances.slice_tolerance, False,
                                note="slice missing from the retrained head's validation data"))
            continue
        got, got_n = cand_slices[name]
        limit = acc - tolerances.slice_tolerance
        checks.append(Check(key, got, limit, got >= limit,
                            note=f"production {acc:.4g} - slice tolerance {tolerances.slice_tolerance:g}, "
                                 f"n={got_n if got_n is not None else n}"))
    if heldout is not None:
        if heldout.candidate_accuracy is None or heldout.production_accuracy is None:
            checks.append(Check("heldout_accuracy", None, 0.0, False,
                                note=f"{heldout.source}: no held-out image could be scored"))
        else:
            limit = heldout.production_accuracy - tolerances.tolerance
            checks.append(Check("heldout_accuracy", heldout.candidate_accuracy, limit,
                                heldout.candidate_accuracy >= limit,
                                note=f"production {heldout.production_accuracy:.4g} - tolerance "
                                     f"{tolerances.tolerance:g}, on {heldout.images} images of {heldout.source}"))
    if golden is not None:
        shown = "; ".join(f"{p}: want {want}, got {got}" for p, want, got in golden.wrong[:3])
        more = f" (+{len(golden.wrong) - 3} more)" if len(golden.wrong) > 3 else ""
        checks.append(Check("golden", float(golden.correct), float(golden.total), not golden.wrong,
                            note=(f"{golden.source}: " + (shown + more if golden.wrong else "all correct"))))
    return GateReport(all(c.passed for c in checks), checks)
