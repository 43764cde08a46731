"""Production monitoring: what each head saw at registration vs what a bulk run sees.

- :mod:`heads.monitor.stats`: streaming, mergeable accumulators a bulk run updates per
  batch (:class:`PredictionStats` per head, :class:`FeatureStats` per tap).
- :mod:`heads.monitor.reference`: :class:`HeadReference`, what a head version remembers
  at registration (validation predictions, training-feature statistics at its tap).
- :mod:`heads.monitor.drift`: the statistics, :class:`DriftThresholds` (the ``monitor:``
  block of a head config) and :func:`assess`, which turns a reference and a run's stats
  into a :class:`HeadDrift` verdict (ok / watch / drift).

Nothing here imports mlflow; logging, tags and reports live in :mod:`registry`.
"""

from heads.monitor.drift import DriftThresholds, HeadDrift, assess, attention_lines
from heads.monitor.reference import HeadReference, HeadReferenceError
from heads.monitor.stats import FeatureStats, PredictionStats, load_run_stats, row_keys, save_run_stats, summarise_tap

__all__ = [
    "DriftThresholds", "FeatureStats", "HeadDrift", "HeadReference", "PredictionStats", "HeadReferenceError", "assess",
    "attention_lines", "load_run_stats", "row_keys", "save_run_stats", "summarise_tap",
]
