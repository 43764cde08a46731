"""Drift of one head in one bulk run, against its reference: the figures, a verdict, a reason.

Three questions per head, three statistics, each gated twice: by an *effect size* (is the
change big enough to matter?) and by a *significance level* (is it more than the noise of
finite samples?). A head's verdict is the worst of the three.

1. Did its predicted-label mix change? **PSI** (population stability index, the symmetric
   KL divergence ``sum (q - p) ln(q / p)``) between the reference's validation
   predictions and the run's, with add-1/2 (Jeffreys) smoothing so an empty class gives a
   finite figure. PSI, because its bands (0.1 "watch", 0.25 "act") are what practitioners
   already read; Jensen-Shannon (base 2, bounded in [0, 1]) is reported beside it for a
   scale-free view. But PSI on finite samples is biased upward: with no shift its
   expectation is about ``(K - 1) (1/n + 1/m)`` (0.36 for 10 classes and 50 images a
   side, far above the 0.25 band). So the verdict needs the band *and* significance:
   the p-value of PSI under no shift, from a parametric bootstrap (both sides redrawn
   from the pooled label mix at their own sizes, B times; O(B * K), whatever the run's
   size). Asymptotically ``PSI / (1/n + 1/m)`` is chi-square with ``K - 1`` degrees of
   freedom, but that approximation was measured too liberal with rare classes at small
   counts; the bootstrap sees the smoothing and the rare classes as the statistic does.
   A run or reference with fewer than ``min_predictions`` predictions is not judged.
2. Did the inputs at its tap move away from its training features? A two-sample
   **MMD test** (maximum mean discrepancy, RBF kernel, bandwidth by the median heuristic)
   between the reference's sample of training features and the run's sample, both
   standardised by the reference's per-dimension mean and std (so that no channel's scale
   dominates the kernel), with a permutation p-value. Why MMD: it is multivariate (it sees
   a joint shift that no single dimension shows, and needs no correction over D
   dimensions), consistent against any change of distribution, and needs only torch on a
   bounded sample (256 rows a side: a 512 x 512 kernel). The permutation p-value
   ``(1 + #{perm >= observed}) / (1 + B)`` is exact, not asymptotic: under no shift the
   rows are exchangeable, so ``P(p <= alpha) <= alpha`` for every alpha and every sample
   size. ``B`` is sized so that the smallest threshold is reachable
   (``B >= 2 * family_size / alpha_drift``); all permutations come from one kernel
   matrix as batched quadratic forms, so B = 2000 costs milliseconds. Alternatives left
   out: per-dimension KS tests with a Bonferroni correction over hundreds of dimensions
   lose power on joint shifts and are one test per dimension; a domain classifier needs
   training, a held-out split and its own calibration per run; the energy distance is a
   special case of MMD with a fixed kernel; scipy (installed) is not needed for any of it.
3. Did it become unsure? The share of predictions with top score below
   ``low_confidence_below``, reference vs run, gated by an absolute rise and a one-sided
   bootstrap p-value of that rise under the pooled share (a z-test is liberal at small
   counts for the same reason).

Also reported, not judged: the **mean shift** of the moments, per dimension
``(mean_run - mean_ref) / std_ref``, as its root mean square and maximum over dimensions
and the most-shifted dimensions: a cheap, readable "how far, in std units" that needs no
sample. It is not a test: dimensions are correlated, so a diagonal chi-square would be
miscalibrated; the MMD carries the verdict.

False alarms the defaults promise (no shift, per head per run, ``family_size = 1``):
the feature test says "drift" with probability <= ``alpha_drift`` (0.001) and at least
"watch" with probability <= ``alpha_watch`` (0.01), exactly (permutation test). The
label and low-confidence gates add about the same again each (bootstrap p-values: close
to exact; the effect-size bands make them rarer still on large runs), so a head's verdict is a false "drift" with
probability <= 3 * alpha_drift. Pass ``family_size`` = the number of heads assessed in one
run to control the run as a whole instead (Bonferroni: every alpha is divided by it, so
"any head of the run falsely drifts" has probability <= 3 * alpha_drift). The tests in
``tests/heads/monitor/test_drift.py`` measure these rates over repeated seeds.

Thresholds live in a head config's ``monitor:`` block (all optional; the field names of
:class:`DriftThresholds`)::

    monitor:
      label_psi_watch: 0.1
      label_psi_drift: 0.25
      alpha_watch: 0.01
      alpha_drift: 0.001
      low_confidence_below: 0.5         # a multiple of 1/20 (the score histogram's bins)
      low_confidence_rise_watch: 0.05   # absolute rise of the low-confidence share
      low_confidence_rise_drift: 0.15
      min_predictions: 100
      min_feature_rows: 32

Wiring: ``DriftThresholds.from_config(cfg.get("monitor") or {}, source=config_path)``;
per head ``assess(reference, run_preds[head], run_feats[reference.tap], thresholds,
family_size=len(heads), head=head)``; :func:`attention_lines` for classify's summary
(only heads that need attention); :meth:`HeadDrift.to_dict` for JSON / MLflow metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from heads.monitor.stats import FeatureStats, PredictionStats

if TYPE_CHECKING:
    from heads.monitor.reference import HeadReference

VERDICTS = ("ok", "watch", "drift")
SMOOTHING = 0.5
MMD_CHUNK = 256
MMD_TOLERANCE = 1e-6


class DriftConfigError(ValueError):
    """A ``monitor:`` block that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DriftThresholds:
    """Platform defaults for a head's drift verdict; a head config's ``monitor:`` block overrides any field.

    Attributes:
        label_psi_watch: PSI of the predicted-label mix at which a significant change is "watch".
        label_psi_drift: ... and "drift" (the customary 0.1 / 0.25 bands).
        alpha_watch: significance level for "watch" on every test (false "watch" per test per run).
        alpha_drift: significance level for "drift" on every test (false "drift" per test per run).
        low_confidence_below: a prediction with top score below this is low-confidence.
        low_confidence_rise_watch: absolute rise of the low-confidence share for "watch".
        low_confidence_rise_drift: ... and for "drift".
        min_predictions: fewer predictions (run or reference) and labels / confidence are not judged.
        min_feature_rows: fewer sampled feature rows (either side) and features are not judged.
        min_permutations: the feature test's permutations are at least this many.
    """

    label_psi_watch: float = 0.1
    label_psi_drift: float = 0.25
    alpha_watch: float = 0.01
    alpha_drift: float = 0.001
    low_confidence_below: float = 0.5
    low_confidence_rise_watch: float = 0.05
    low_confidence_rise_drift: float = 0.15
    min_predictions: int = 100
    min_feature_rows: int = 32
    min_permutations: int = 200

    def __post_init__(self) -> None:
        self._check("monitor")

    def _check(self, source: str) -> None:
        def bad(name: str, why: str) -> DriftConfigError:
            return DriftConfigError(f"{source}: monitor.{name} = {getattr(self, name)!r} {why}")

        if not 0.0 <= self.label_psi_watch <= self.label_psi_drift:
            raise bad("label_psi_watch", f"must be >= 0 and <= label_psi_drift ({self.label_psi_drift})")
        if not 0.0 < self.alpha_drift <= self.alpha_watch < 1.0:
            raise bad("alpha_drift", f"must be > 0 and <= alpha_watch ({self.alpha_watch}) < 1")
        if not 0.0 < self.low_confidence_below <= 1.0:
            raise bad("low_confidence_below", "must be in (0, 1]")
        if not 0.0 <= self.low_confidence_rise_watch <= self.low_confidence_rise_drift <= 1.0:
            raise bad("low_confidence_rise_watch", f"must be in [0, low_confidence_rise_drift "
                                                   f"({self.low_confidence_rise_drift})] and that <= 1")
        for name in ("min_predictions", "min_feature_rows", "min_permutations"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")

    @classmethod
    def from_config(cls, monitor: Mapping[str, Any] | None, source: str = "head config",
                    base: DriftThresholds | None = None) -> DriftThresholds:
        """Thresholds from a ``monitor:`` block (a mapping; None or empty gives ``base``, the platform defaults).

        Raises:
            DriftConfigError: an unknown field, a value of the wrong type, or inconsistent values,
                in one line naming ``source`` and the field.
        """
        base = base or cls()
        if not monitor:
            return base
        if not isinstance(monitor, Mapping):
            raise DriftConfigError(f"{source}: monitor must be a mapping of settings, got {type(monitor).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = asdict(base)
        for key, value in monitor.items():
            if key not in known:
                raise DriftConfigError(f"{source}: monitor.{key} is not a monitor setting "
                                       f"(known: {', '.join(sorted(known))})")
            want_int = known[key].type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (want_int and not isinstance(value, int)):
                raise DriftConfigError(f"{source}: monitor.{key} = {value!r} must be {'an integer' if want_int else 'a number'}")
            values[key] = int(value) if want_int else float(value)
        out = cls.__new__(cls)
        for key, value in values.items():
            object.__setattr__(out, key, value)
        out._check(source)
        return out


# ----------------------------------------------------------------------------- statistics


def _multinomial(total: int, probs: torch.Tensor, draws: int, g: torch.Generator) -> torch.Tensor:
    # (draws, K) multinomial counts by sequential binomials: O(draws * K), whatever ``total`` is
    # (a run may hold millions of predictions).
    out = torch.zeros(draws, probs.numel(), dtype=torch.float64)
    remaining = torch.full((draws,), float(total), dtype=torch.float64)
    rest = 1.0
    for i, p in enumerate(probs.tolist()):
        share = min(max(p / rest, 0.0), 1.0) if rest > 0 else 0.0
        out[:, i] = torch.binomial(remaining, torch.full_like(remaining, share), generator=g)
        remaining = remaining - out[:, i]
        rest -= p
    return out


def _psi_rows(ref: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    p = (ref + SMOOTHING) / (ref + SMOOTHING).sum(dim=-1, keepdim=True)
    q = (run + SMOOTHING) / (run + SMOOTHING).sum(dim=-1, keepdim=True)
    return ((q - p) * (q / p).log()).sum(dim=-1)


def label_divergence(reference: torch.Tensor, run: torch.Tensor, draws: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """PSI, Jensen-Shannon (bits) and the PSI's no-shift p-value between two label-count vectors.

    Classes neither side predicted are left out (they carry no information). Counts are
    smoothed by 1/2 per class. The p-value is a parametric bootstrap under no shift: both
    sides redrawn ``draws`` times from the pooled label mix with their own sizes, p =
    ``(1 + #{PSI_b >= PSI}) / (1 + draws)``. The chi-square approximation
    (``PSI / (1/n + 1/m) ~ chi2_{K-1}``) was measured too liberal at small counts (1.75%
    false alarms at alpha 1%, 10 classes, 100 predictions a side); the bootstrap keeps
    the smoothing and the rare classes exactly as the statistic sees them.

    Returns:
        ``(psi, js, p_value)``; ``(0, 0, 1)`` when fewer than two classes occur.
    """
    keep = (reference + run) > 0
    k = int(keep.sum())
    n, m = int(reference.sum()), int(run.sum())
    if k < 2 or not n or not m:
        return 0.0, 0.0, 1.0
    ref, cur = reference.double()[keep], run.double()[keep]
    psi = float(_psi_rows(ref, cur))
    p, q = (ref + SMOOTHING) / (ref + SMOOTHING).sum(), (cur + SMOOTHING) / (cur + SMOOTHING).sum()
    mid = (p + q) / 2
    js = float(0.5 * (p * (p / mid).log2()).sum() + 0.5 * (q * (q / mid).log2()).sum())
    pooled = (ref + cur) / (n + m)
    g = torch.Generator().manual_seed(int(seed))
    boot = _psi_rows(_multinomial(n, pooled, draws, g), _multinomial(m, pooled, draws, g))
    p_value = (1 + int((boot >= psi - 1e-12).sum())) / (1 + draws)
    return psi, max(js, 0.0), p_value


def proportion_rise(ref_hits: int, n: int, run_hits: int, m: int, draws: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Rise of a share from reference to run and its one-sided no-shift p-value (parametric bootstrap, as above)."""
    rise = run_hits / m - ref_hits / n
    pooled = (ref_hits + run_hits) / (n + m)
    if pooled <= 0.0 or pooled >= 1.0:
        return rise, 1.0
    g = torch.Generator().manual_seed(int(seed))
    share = torch.full((draws,), pooled, dtype=torch.float64)
    boot = (torch.binomial(torch.full_like(share, float(m)), share, generator=g) / m
            - torch.binomial(torch.full_like(share, float(n)), share, generator=g) / n)
    return rise, (1 + int((boot >= rise - 1e-12).sum())) / (1 + draws)


def _standardiser(reference: FeatureStats) -> tuple[torch.Tensor, torch.Tensor]:
    var = reference.var
    # A constant dimension (e.g. a dead ReLU channel) would divide by zero: floor its scale.
    floor = 1e-12 + 1e-6 * float(var.mean()) if var.numel() else 1e-12
    return reference.mean, var.clamp(min=floor).sqrt()


def mean_shift(reference: FeatureStats, run: FeatureStats, top: int = 5) -> tuple[float, float, list[list[float]]]:
    """Standardised per-dimension mean shift: ``(rms, max |z|, [[dim, z], ...] most shifted)``."""
    center, scale = _standardiser(reference)
    z = (run.mean - center) / scale
    order = z.abs().argsort(descending=True)[:top]
    return float(z.square().mean().sqrt()), float(z.abs().max()), [[int(i), float(z[i])] for i in order]


def mmd_test(x: torch.Tensor, y: torch.Tensor, permutations: int, seed: int = 0) -> tuple[float, float, float]:
    """Two-sample MMD test with an RBF kernel (median-heuristic bandwidth) and a permutation p-value.

    Args:
        x: ``(n, D)`` sample (the reference), y: ``(m, D)`` sample (the run); both already standardised.
        permutations: B random relabellings of the pooled rows.
        seed: seeds the permutations.

    Returns:
        ``(mmd2, p_value, bandwidth)``: the unbiased MMD^2 estimate, ``(1 + #{perm >= observed}) / (1 + B)``
        and the kernel's sigma.
    """
    n, m = int(x.shape[0]), int(y.shape[0])
    z = torch.cat([x, y]).to(torch.float64)
    d2 = torch.cdist(z, z).square()
    off = d2[~torch.eye(n + m, dtype=torch.bool)]
    sigma2 = float(off.median()) if off.numel() else 1.0
    sigma2 = sigma2 if sigma2 > 0 else 1.0
    # float32 for the permutation matmuls (twice as fast); its rounding (~1e-7 of MMD^2) is far
    # below the permutation spread, and the tolerance below absorbs it conservatively.
    kernel = torch.exp(-d2 / (2 * sigma2)).to(torch.float32)
    row_sums = kernel.sum(dim=1)
    total = float(row_sums.sum())

    def stat(u: torch.Tensor) -> torch.Tensor:
        # u: (P, n+m) 0/1 indicators of the "x" side; one matmul gives every quadratic form.
        sxx = ((u @ kernel) * u).sum(dim=1)
        sxy = u @ row_sums - sxx
        syy = total - 2 * sxy - sxx
        # The RBF diagonal is 1: subtract it for the unbiased within-sample means.
        return (sxx - n) / (n * (n - 1)) + (syy - m) / (m * (m - 1)) - 2 * sxy / (n * m)

    first = torch.zeros(1, n + m, dtype=torch.float32)
    first[0, :n] = 1.0
    observed = float(stat(first)[0])
    g = torch.Generator().manual_seed(int(seed))
    exceed = 0
    for start in range(0, permutations, MMD_CHUNK):
        p = min(MMD_CHUNK, permutations - start)
        # A uniformly random n-subset per row: the rows whose i.i.d. uniform lies above the row's
        # m-th smallest (exactly n of them; ties have probability 0). Cheaper than an argsort.
        r = torch.rand(p, n + m, generator=g)
        u = (r > r.kthvalue(m, dim=1, keepdim=True).values).to(torch.float32)
        # A tolerance counts near-ties (float rounding) as exceedances: conservative, never anti-conservative.
        exceed += int((stat(u) >= observed - MMD_TOLERANCE).sum())
    return observed, (1 + exceed) / (1 + permutations), math.sqrt(sigma2)


# ----------------------------------------------------------------------------- assessment


@dataclass
class HeadDrift:
    """One head's drift in one run: figures, per-question verdicts (None: not judged), verdict and reason.

    ``to_dict`` / ``from_dict`` give a plain JSON-able form (MLflow metrics, history files).
    """

    head: str
    tap: str
    verdict: str
    reason: str
    label_verdict: str | None = None
    feature_verdict: str | None = None
    confidence_verdict: str | None = None
    n_reference: int = 0
    n_run: int = 0
    label_psi: float | None = None
    label_js: float | None = None
    label_p: float | None = None
    low_confidence_below: float = 0.5
    low_confidence_reference: float | None = None
    low_confidence_run: float | None = None
    low_confidence_p: float | None = None
    n_feature_reference: int = 0
    n_feature_run: int = 0
    mmd2: float | None = None
    feature_p: float | None = None
    permutations: int = 0
    bandwidth: float | None = None
    mean_shift_rms: float | None = None
    mean_shift_max: float | None = None
    top_shifted: list[list[float]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    reference_labels: list[float] = field(default_factory=list)
    run_labels: list[float] = field(default_factory=list)
    reference_scores: list[float] = field(default_factory=list)
    run_scores: list[float] = field(default_factory=list)
    alpha_watch: float = 0.01
    alpha_drift: float = 0.001
    label_psi_watch: float = 0.1
    label_psi_drift: float = 0.25

    @property
    def needs_attention(self) -> bool:
        return self.verdict != "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadDrift:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _level(effect: float, p: float, watch: tuple[float, float], drift: tuple[float, float]) -> str:
    if effect >= drift[0] and p <= drift[1]:
        return "drift"
    if effect >= watch[0] and p <= watch[1]:
        return "watch"
    return "ok"


def _worst(*verdicts: str | None) -> str:
    return max((v for v in verdicts if v is not None), key=VERDICTS.index, default="ok")


def _distribution(counts: torch.Tensor) -> list[float]:
    total = int(counts.sum())
    return (counts.double() / max(total, 1)).tolist() if total else []


def permutations_for(thresholds: DriftThresholds, family_size: int = 1) -> int:
    """Permutations the feature test runs: enough that ``alpha_drift / family_size`` is reachable, twice over."""
    return max(thresholds.min_permutations, math.ceil(2 * family_size / thresholds.alpha_drift))


def assess(reference: HeadReference, run_predictions: PredictionStats | None, run_features: FeatureStats | None,
           thresholds: DriftThresholds | None = None, *, family_size: int = 1, head: str | None = None,
           seed: int = 0) -> HeadDrift:
    """Compare one head's run stats with its reference and give a verdict.

    Args:
        reference: the head version's :class:`~heads.monitor.reference.HeadReference`.
        run_predictions: the head's :class:`PredictionStats` from the run (None: not recorded).
        run_features: the run's :class:`FeatureStats` at the head's tap (None: not recorded).
        thresholds: the head's thresholds (platform defaults when None).
        family_size: heads assessed in this run; every alpha is divided by it (Bonferroni).
        head: name to report (defaults to the reference's ``meta["head"]``).
        seed: seeds the permutation test (fixed: the same stats give the same p-value).

    Returns:
        a :class:`HeadDrift`.

    Raises:
        ValueError: the run's classes or feature width differ from the reference's.
    """
    t = thresholds or DriftThresholds()
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    a_watch, a_drift = t.alpha_watch / family_size, t.alpha_drift / family_size
    ref_pred = reference.predictions
    out = HeadDrift(head=head or reference.meta.get("head", ""), tap=reference.tap, verdict="ok", reason="",
                    n_reference=ref_pred.count, classes=list(reference.classes),
                    reference_labels=_distribution(ref_pred.label_counts),
                    reference_scores=_distribution(ref_pred.score_counts),
                    low_confidence_below=t.low_confidence_below, alpha_watch=a_watch, alpha_drift=a_drift,
                    label_psi_watch=t.label_psi_watch, label_psi_drift=t.label_psi_drift)
    notes: list[str] = []
    if ref_pred.count:
        out.low_confidence_reference = ref_pred.low_confidence_share(t.low_confidence_below)

    if run_predictions is not None:
        if run_predictions.classes != ref_pred.classes or run_predictions.bins != ref_pred.bins:
            raise ValueError(f"head '{out.head}': the run's classes/bins {run_predictions.classes}/{run_predictions.bins} "
                             f"differ from its reference's {ref_pred.classes}/{ref_pred.bins}")
        out.n_run = run_predictions.count
        out.run_labels = _distribution(run_predictions.label_counts)
        out.run_scores = _distribution(run_predictions.score_counts)
        if out.n_run:
            out.low_confidence_run = run_predictions.low_confidence_share(t.low_confidence_below)
        if min(out.n_run, out.n_reference) >= t.min_predictions:
            draws = permutations_for(t, family_size)
            out.label_psi, out.label_js, out.label_p = label_divergence(ref_pred.label_counts,
                                                                        run_predictions.label_counts, draws, seed)
            out.label_verdict = _level(out.label_psi, out.label_p, (t.label_psi_watch, a_watch),
                                       (t.label_psi_drift, a_drift))
            rise, out.low_confidence_p = proportion_rise(
                ref_pred.low_confidence_count(t.low_confidence_below), out.n_reference,
                run_predictions.low_confidence_count(t.low_confidence_below), out.n_run, draws, seed)
            out.confidence_verdict = _level(rise, out.low_confidence_p, (t.low_confidence_rise_watch, a_watch),
                                            (t.low_confidence_rise_drift, a_drift))
        else:
            notes.append(f"labels not judged ({min(out.n_run, out.n_reference)} < {t.min_predictions} predictions)")
    else:
        notes.append("no prediction stats")

    ref_feat = reference.features
    if ref_feat is not None and run_features is not None and run_features.count:
        if run_features.dim != ref_feat.dim:
            raise ValueError(f"head '{out.head}': the run's features at tap '{reference.tap}' have width "
                             f"{run_features.dim}, its reference's {ref_feat.dim}")
        out.mean_shift_rms, out.mean_shift_max, out.top_shifted = mean_shift(ref_feat, run_features)
        out.n_feature_reference, out.n_feature_run = int(ref_feat.sample.shape[0]), int(run_features.sample.shape[0])
        if min(out.n_feature_reference, out.n_feature_run) >= t.min_feature_rows:
            center, scale = _standardiser(ref_feat)
            out.permutations = permutations_for(t, family_size)
            out.mmd2, out.feature_p, out.bandwidth = mmd_test((ref_feat.sample.double() - center) / scale,
                                                              (run_features.sample.double() - center) / scale,
                                                              out.permutations, seed=seed)
            out.feature_verdict = _level(1.0, out.feature_p, (0.0, a_watch), (0.0, a_drift))
        else:
            notes.append(f"features not judged ({min(out.n_feature_reference, out.n_feature_run)} < "
                         f"{t.min_feature_rows} sampled rows)")
    else:
        notes.append("no feature stats")

    out.verdict = _worst(out.label_verdict, out.feature_verdict, out.confidence_verdict)
    out.reason = _reason(out, t, notes)
    return out


def _reason(d: HeadDrift, t: DriftThresholds, notes: list[str]) -> str:
    parts: list[str] = []
    if d.feature_verdict in ("watch", "drift"):
        parts.append(f"input drift at tap '{d.tap}': MMD p={d.feature_p:.2g} <= "
                     f"{d.alpha_drift if d.feature_verdict == 'drift' else d.alpha_watch:.2g} "
                     f"(mean shift {d.mean_shift_rms:.2f} std rms, {d.mean_shift_max:.2f} max)")
    if d.label_verdict in ("watch", "drift"):
        band = t.label_psi_drift if d.label_verdict == "drift" else t.label_psi_watch
        parts.append(f"label mix changed: PSI {d.label_psi:.3f} >= {band:g} (p={d.label_p:.2g})")
    if d.confidence_verdict in ("watch", "drift"):
        parts.append(f"low-confidence share (score < {t.low_confidence_below:g}) "
                     f"{d.low_confidence_reference:.1%} -> {d.low_confidence_run:.1%}")
    if not parts:
        figures = []
        if d.label_psi is not None:
            figures.append(f"label PSI {d.label_psi:.3f}")
        if d.feature_p is not None:
            figures.append(f"feature p={d.feature_p:.2g}")
        parts.append("no shift detected" + (f" ({', '.join(figures)})" if figures else ""))
    return "; ".join(parts + notes)


def attention_lines(drifts: Sequence[HeadDrift]) -> list[str]:
    """One line per head that needs attention (watch or drift), drift first: for classify's summary."""
    flagged = sorted((d for d in drifts if d.needs_attention), key=lambda d: (-VERDICTS.index(d.verdict), d.head))
    return [f"{d.head}: {d.verdict.upper()}: {d.reason}" for d in flagged]
