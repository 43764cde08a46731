"""Short, human-readable summaries that the tools print at the end of a job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
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
        f"{success.get('shards_written', 0)} written, {success.get('shards_reused', 0)} already there"
        + (f", {success['shards_by_others']} by another run" if success.get("shards_by_others") else ""),
    ]
    for reason, n in sorted(success.get("errors_by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  error {reason}: {n}")
    return lines


# -- tools.report: readable at hundreds of heads ----------------------------------------------
def _v(value: Any) -> str:
    return "-" if value is None else f"v{value}"


def _acc(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _share(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return ""
    return f" ({100 * part / whole:.2f}% of the trunk's {whole:.4g})"


def summary_lines(attention: dict[str, Any]) -> list[str]:
    """The report's opening lines: what serves, how many heads, how many need attention, the cost."""
    s = attention["summary"]
    if s["release_version"] is None:
        return [f"no release to report on; {s['heads_registered']} head(s) registered"]
    taps = ", ".join(f"{n} on {tap}" for tap, n in s["taps"].items()) or "none"
    lines = [
        f"release v{s['release_version']}: trunk v{s['trunk_version']} (trunk_id {s['trunk_id']}), "
        f"{s['heads_in_production']} heads in production ({taps}); {s['heads_registered']} registered",
        f"needs attention: {s['failing']} failing their gate, {s['stale']} stale (latest version on another "
        f"trunk than production's), {s['accuracy_drops']} with a newer version that scores lower",
        f"cost of all production heads per image: {s['heads_gflops']:.4g} GFLOPs"
        f"{_share(s['heads_gflops'], s['trunk_gflops'])}, {s['heads_ms_per_image']:.4g} ms"
        f"{_share(s['heads_ms_per_image'], s['trunk_ms_per_image'])}",
    ]
    if s["min_val_accuracy"] is not None:
        lines.append(f"val accuracy: lowest {s['min_val_accuracy']:.4f}, median {s['median_val_accuracy']:.4f}")
    return lines


def _section(title: str, items: list[Any], limit: int | None, line: Callable[[Any], str]) -> list[str]:
    shown = items if limit is None else items[:limit]
    out = [f"{title} ({len(items)})"]
    out += ["  " + line(item) for item in shown] or ["  none"]
    if len(shown) < len(items):
        out.append(f"  ... and {len(items) - len(shown)} more (full table: see below)")
    return out


def attention_lines(attention: dict[str, Any], limit: int | None = 20) -> list[str]:
    """The heads that need attention first, each section at most ``limit`` lines (None: all)."""
    s = attention["summary"]
    trunk_gflops = s.get("trunk_gflops")
    lines = _section("failing their gate (latest version registered, not shipped)", attention["failing"], limit,
                     lambda d: f"{d['head']:<24} latest {_v(d['latest_version'])}, production "
                               f"{_v(d['production_version'])}")
    lines += _section("stale (latest version trained on another trunk than production's)", attention["stale"], limit,
                      lambda d: f"{d['head']:<24} latest {_v(d['latest_version'])} on trunk "
                                f"{_v(d['latest_trunk_version'])}, production {_v(d['production_version'])} on "
                                f"trunk {_v(d['production_trunk_version'])}")
    lines += _section("most costly (added GFLOPs per image)", attention["costly"], limit,
                      lambda r: f"{r['head']:<24} {r['added_gflops']:.4g} GFLOPs"
                                + (f" ({100 * r['added_gflops'] / trunk_gflops:.2f}% of the trunk)" if trunk_gflops
                                   else "")
                                + f", tap {r.get('tap') or '-'}, val_accuracy {_acc(r.get('val_accuracy'))}")
    lines += _section("largest accuracy drops (newest version against production's)", attention["drops"], limit,
                      lambda d: f"{d['head']:<24} {_v(d['latest_version'])} {_acc(d['latest_accuracy'])} against "
                                f"{_v(d['production_version'])} {_acc(d['production_accuracy'])} "
                                f"(-{d['drop']:.4f})")
    return lines


def trunk_count_lines(dependencies: list[dict[str, Any]], production_trunk: int | None,
                      aliases: dict[int, list[str]] | None = None) -> list[str]:
    """Per trunk version, how many head versions were trained on it (the short form of the dependencies)."""
    counts: dict[int, int] = {int(t): 0 for t in (aliases or {})}
    if production_trunk is not None:
        counts.setdefault(int(production_trunk), 0)
    heads: dict[int, set[str]] = {}
    for row in dependencies:
        for trunk_version, versions in row["trunk_versions"].items():
            counts[int(trunk_version)] = counts.get(int(trunk_version), 0) + len(versions)
            heads.setdefault(int(trunk_version), set()).add(row["head"])
    lines = []
    for trunk_version, n in sorted(counts.items()):
        labels = (["production"] if trunk_version == production_trunk else []) + \
            [a for a in (aliases or {}).get(trunk_version, []) if a not in ("production",)]
        lines.append(f"trunk v{trunk_version} ({', '.join(labels) or '-'}): {n} head versions of "
                     f"{len(heads.get(trunk_version, ()))} heads")
    return lines


def report_lines(report: dict[str, Any], limit: int = 20, full: bool = False) -> list[str]:
    """What ``tools.report`` prints: summary, heads that need attention, and where the full table is.

    The full leaderboard and dependency tables are printed only with ``full`` or when there
    are at most ``limit`` heads; otherwise the output stays about ``4 * limit + 20`` lines
    whatever the number of heads, and names the files that hold every head.
    """
    att = report["attention"]
    n_rows, n_deps = len(report["rows"]), len(report["dependencies"])
    lines = summary_lines(att) + [""] + attention_lines(att, None if full else limit) + [""]
    if full or n_rows <= limit:
        lines += [*report["table"].splitlines(), ""]
    else:
        lines += [f"full table of the {n_rows} production heads: not printed (more than attention_rows={limit}; "
                  f"full=true prints it)"]
    if full or n_deps <= limit:
        lines += [*report["dependencies_text"].splitlines(), ""]
    else:
        lines += ["heads by trunk version"]
        lines += trunk_count_lines(report["dependencies"], report.get("production_trunk"), report.get("trunk_aliases"))
        lines += [""]
    lines += [f"full table: {report['csv']} (CSV), {report['markdown']} (Markdown)",
              f"  and MLflow table 'leaderboard.json' in the experiment 'reports', run {report['run_id']}",
              f"summary: {report['summary_markdown']}; dependencies: {report['dependencies_markdown']}",
              f"plot: {report['png']}"]
    return lines


def report_folder(workspace_root: str | Path, stem: str) -> Path:
    """A new folder ``<workspace>/reports/<stem>-<time>`` (``+1``, ``+2``, ... when that one exists), created."""
    out = Path(workspace_root) / "reports" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while out.exists():
        suffix += 1
        out = out.with_name(f"{out.name.split('+')[0]}+{suffix}")
    out.mkdir(parents=True)
    return out
