"""Short, human-readable summaries that the tools print at the end of a job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from heads.training.cost import format_ms


def narrator(logger: logging.Logger, echo: Callable[[str], None] | None) -> Callable[[str], None]:
    """One line per step of a long job: always logged (the run's log file), and handed to
    ``echo`` when the caller wants it shown (the tools pass ``print``); library code never prints.
    """

    def say(line: str) -> None:
        logger.info(line)
        if echo is not None:
            echo(line)

    return say


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def head_job_lines(job) -> list[str]:
    """What ``tools.train_head`` prints: metrics, cost, gate, where it went."""
    r = job.result
    m = r.metrics
    lines = [
        f"head.{r.name} v{job.version}  (trunk v{job.trunk_version}, trunk_id {r.trunk_id}, tap {r.tap})",
        f"  val_accuracy {m['val_accuracy']:.4f}  val_macro_f1 {m['val_macro_f1']:.4f}  "
        f"params {int(m['params'])}  added_gflops {m['added_gflops']:.3g}  "
        f"added_ms_per_image {format_ms(m['added_ms_per_image'], m.get('added_ms_per_image_spread'), '{:.3g}')}",
    ]
    if r.slice_accuracy:
        worst = min(r.slice_accuracy.items(), key=lambda kv: kv[1]["accuracy"])
        lines.append(f"  slices: {len(r.slice_accuracy)}, worst '{worst[0]}' "
                     f"{worst[1]['accuracy']:.4f} (n={worst[1]['n']})")
    lines.extend("  " + line for line in job.gate.format().splitlines())
    if job.release is not None:
        lines.append(f"  promoted: release v{job.release.version} is now production "
                     f"({len(job.release.heads)} heads on trunk v{job.release.trunk_version})")
    elif job.refused:
        lines.append(f"  not promoted: {job.refused}")
    elif not job.gate.passed:
        lines.append("  not promoted: the gate failed; production is untouched")
    else:
        lines.append("  not promoted (promote=false)")
    return lines


def extract_lines(summary: dict[str, Any]) -> list[str]:
    keys = ("images", "new_rows", "reused_rows", "errors", "images_per_s")
    return ["  ".join(f"{k} {_fmt(summary[k])}" for k in keys if k in summary)]


def classify_lines(success: dict[str, Any], output: str) -> list[str]:
    c = success["counts"]
    rel = success["release"]
    heads = rel.get("heads") or {}
    lines = [
        f"classified {c['images']} images ({c['ok']} ok, {c['errors']} errors) into {output}",
        f"  release v{rel.get('version')}: trunk v{rel.get('trunk_version')}, heads "
        + ", ".join(f"{name} v{version}" for name, version in sorted(heads.items())),
        f"  {success.get('images_per_s', 0):.1f} images/s over {success.get('seconds', 0):.1f} s "
        f"({success.get('backend', 'local')}); shards {c.get('shards')}: "
        f"{success.get('shards_written', 0)} written, {success.get('shards_reused', 0)} already there",
    ]
    for reason, n in sorted(success.get("errors_by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  error {reason}: {n}")
    return lines
