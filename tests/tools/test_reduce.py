"""``python -m tools.reduce`` as platform owners run it: quantized, distilled and combined candidates, one report."""

from __future__ import annotations

import json
from pathlib import Path

from tests.registry.jobs import cascade_state as cs
from tests.tools.test_refresh import run_tool, ws  # noqa: F401  (the module-scoped workspace fixture)


def test_reduce_searches_schemes_students_and_both_and_proposes_the_smallest_passing(ws):  # noqa: F811
    proc = run_tool("reduce", f"workspace={ws}", "space.schemes=[static,dynamic]", "space.student_schemes=[static]",
                    "distill.epochs=1", "cost=bytes", "promote=false", "progress=false", "contract.tolerance=1.0",
                    "contract.slice_tolerance=1.0", "quantize.calibration_images=32")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ResNets have no Linear layers: dynamic int8 is refused in one line, and the search goes on.
    assert "dynamic: not built:" in out and "use static" in out
    for name in ("static", "student_half", "student_half-static"):
        assert f"{name}: trunk v" in out
    report = json.loads(Path(next(line for line in out.splitlines() if line.startswith("report: ")).split()[1])
                        .with_name("reductions.json").read_text())
    rows = {c["name"]: c for c in report["candidates"]}
    assert rows["dynamic"]["verdict"] == "not built"
    # The student quantized is the smallest by construction: half the widths, 1 byte a weight.
    assert report["chosen"] == "student_half-static" and "PROPOSED student_half-static" in out
    sizes = {n: rows[n]["cost"]["bytes"] for n in ("static", "student_half", "student_half-static")}
    assert sizes["student_half-static"] < min(sizes["static"], sizes["student_half"]) < report["baseline"]["bytes"]
    assert all(set(rows[n]["kept"]) == set(cs.HEADS) for n in sizes)
    # Quantizing the student started from the distilled student's version, not production's.
    assert rows["student_half-static"]["version"] > rows["student_half"]["version"]
    assert "production stays release" in out
