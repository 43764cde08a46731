"""Bulk output folders shared with other people's files, odd file names, and failing storage.

Real files, real Parquet, a real tiny trunk. Read-only and full file systems are real
tmpfs mounts where this process may mount them (root in a container); elsewhere a
read-only folder is a real ``chmod`` (which root ignores) and a full disk is the one fault
simulated.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from heads.classify.engine import JOB_FILE, SUCCESS_FILE, classify
from heads.classify.output import foreign_files, job_id
from tests.conftest import write_image
from tests.heads.classify.driver import make_bank
from tools.common import error_line, tool
from trunk.images import path_from_text, path_text, resolve_inputs

RELEASE = {"name": "release", "version": "2", "heads": {"colour": "1", "shape": "4"}}


@pytest.fixture(scope="module")
def bank(tiny_trunk):
    return make_bank(tiny_trunk)


@pytest.fixture
def images(tmp_path) -> list[str]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20), (20, 220, 220), (120, 60, 200)]
    return [str(write_image(tmp_path / "img" / f"good{i}.png", c, size=36 + 2 * i, seed=i))
            for i, c in enumerate(colours)]


def run(trunk, bank, paths, out, **kw):
    return classify(trunk, bank, paths, out, release={**RELEASE, "trunk_id": trunk.trunk_id}, batch_size=2,
                    rows_per_shard=4, progress=False, **kw)


def rows(out: Path) -> list[dict]:
    return [r for s in sorted(out.glob("part-*.parquet")) for r in pq.read_table(s).to_pylist()]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


# -- (a) the job touches only its own files --------------------------------------------------
def _others_files(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    files = {".thesis.tmp": b"chapter 3, unsaved", ".old-upload.tmp": b"someone's upload"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    old = time.time() - 7200
    os.utime(out / ".old-upload.tmp", (old, old))
    return files


def test_folder_with_others_files_is_refused_and_untouched(tmp_path, tiny_trunk, bank, images):
    out = tmp_path / "out"
    files = _others_files(out)
    before = listing(out)
    with pytest.raises(ValueError) as err:
        run(tiny_trunk, bank, images, out)
    assert str(err.value) == (f"{out}: holds '.old-upload.tmp', which the platform did not write; use an empty "
                              "output folder, or allow_foreign_files=true to leave such files alone")
    assert listing(out) == before and all((out / n).read_bytes() == d for n, d in files.items())


def test_others_files_survive_a_job_allowed_to_share_the_folder(tmp_path, tiny_trunk, bank, images):
    out = tmp_path / "out"
    files = _others_files(out)
    before = listing(out)
    clean = run(tiny_trunk, bank, images, tmp_path / "clean")
    # A killed run of this same job left an old temp: that one is garbage, and goes.
    done = run(tiny_trunk, bank, images, out, allow_foreign_files=True)
    assert done["fingerprint"] == clean["fingerprint"] and rows(out) == rows(tmp_path / "clean")
    after = listing(out)
    for name, data in files.items():
        assert after[name] == before[name] and (out / name).read_bytes() == data
    assert sorted(foreign_files(out)) == sorted(files)
    # Resumed with the stale temp of a killed run of this job: only that goes.
    job = job_id(done["fingerprint"])
    stale = out / f".vtp-{job}.part-00001.parquet.4242.0123abcd.tmp"
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    (out / "part-00001.parquet").unlink()
    (out / SUCCESS_FILE).unlink()
    again = run(tiny_trunk, bank, images, out, allow_foreign_files=True)
    assert again["shards_written"] == 1 and not stale.exists() and rows(out) == rows(tmp_path / "clean")
    assert all(listing(out)[n] == before[n] for n in files)
    # Without the flag the same folder is refused, finished or not.
    with pytest.raises(ValueError, match="holds '.old-upload.tmp'"):
        run(tiny_trunk, bank, images, out)


# -- (b) a file name that is not valid UTF-8 --------------------------------------------------
def test_name_that_is_not_utf8_gets_its_own_row(tmp_path, tiny_trunk, bank, images):
    folder = Path(images[0]).parent
    odd = os.fsdecode(str(folder).encode() + b"/bad\xff\xfe.png")
    os.link(images[2], odd)  # the very pixels of good2.png, under a name that is not UTF-8
    notes = os.fsdecode(str(folder).encode() + b"/notes\xe9.jpg")
    Path(notes).write_text("not an image")
    paths = resolve_inputs(folder)  # the folder walk
    assert odd in paths and notes in paths and len(paths) == len(images) + 2
    paths.append(os.fsdecode(str(folder).encode() + b"/gone\xff.png"))
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"".join(os.fsencode(p) + b"\n" for p in paths))
    assert resolve_inputs(manifest) == paths  # the text manifest, line by line in bytes

    out = tmp_path / "out"
    summary = run(tiny_trunk, bank, paths, out)
    got = rows(out)
    assert [r["path"] for r in got] == [path_text(p) for p in paths]  # every row written, in order
    assert [path_from_text(r["path"]) for r in got] == paths  # and the name kept losslessly
    by = {path_from_text(r["path"]): r for r in got}
    twin, same = by[odd], by[images[2]]
    assert twin["path"] == str(folder) + "/bad\\xff\\xfe.png"
    assert twin["error"] is None and twin["sha256"] == same["sha256"]
    for head in bank.names:
        assert twin[f"{head}_label"] == same[f"{head}_label"] and twin[f"{head}_score"] == same[f"{head}_score"]
    assert by[notes]["error"] == f"not an image: {folder}/notes\\xe9.jpg"
    assert by[paths[-1]]["error"] == f"file not found: {folder}/gone\\xff.png"
    assert summary["counts"] == {"images": len(paths), "ok": len(images) + 1, "errors": 2, "shards": 3}


# -- (c) storage failures: one line naming the path; resume stays exact -----------------------
@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real tmpfs mounted at ``path``, or None where this process may not mount one."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    mount = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _tool_line(exc: BaseException) -> str:
    return f"error: {error_line(exc)}"


def test_read_only_output_is_one_line_naming_the_path(tmp_path, tiny_trunk, bank, images):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as mounted:
        if mounted is None:
            if os.geteuid() == 0:
                pytest.skip("root ignores chmod and may not mount here: no real read-only folder")
            (tmp_path / "ro").chmod(0o555)
        out = tmp_path / "ro" / "out"
        with pytest.raises(OSError) as err:
            run(tiny_trunk, bank, images, out)
        assert err.value.errno in (errno.EROFS, errno.EACCES)
        line = _tool_line(err.value)
        assert line in (f"error: {out}: Read-only file system", f"error: {out}: Permission denied")
    # An output folder that exists on a file system gone read-only: the temp file it could not create.
    with tmpfs(tmp_path / "ro2", "1m") as mounted:
        if mounted is None:
            pytest.skip("may not mount here")
        (mounted / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True)
        with pytest.raises(OSError) as err:
            run(tiny_trunk, bank, images, mounted / "out")
        assert err.value.errno == errno.EROFS and "\n" not in _tool_line(err.value)
        assert _tool_line(err.value).startswith(f"error: {mounted / 'out'}/.vtp-")
        assert _tool_line(err.value).endswith(".tmp: Read-only file system")


def test_file_where_the_output_folder_should_be(tmp_path, tiny_trunk, bank, images):
    blocker = tmp_path / "report.pdf"
    blocker.write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=rf"^{blocker}: output is not a folder$"):
        run(tiny_trunk, bank, images, blocker)
    with pytest.raises(NotADirectoryError) as err:
        run(tiny_trunk, bank, images, blocker / "out")
    assert _tool_line(err.value) == f"error: {blocker / 'out'}: Not a directory"
    assert blocker.read_bytes() == b"%PDF"


def test_disk_full_then_freed_resumes_exactly(tmp_path, tiny_trunk, bank, images, monkeypatch):
    clean_out = tmp_path / "clean"
    run(tiny_trunk, bank, images, clean_out)
    with tmpfs(tmp_path / "small", "256k") as mounted:
        out = (mounted or tmp_path) / "out"
        if mounted is not None:
            # Fill the disk but for a few KiB: room for _JOB.json and maybe a shard, not the job.
            filler = mounted / "filler.bin"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            os.truncate(filler, filler.stat().st_size - 9 * 1024)
        else:
            # The one fault simulated: no file system of a chosen size can be made here.
            import trunk.files as trunk_files

            real = trunk_files._write_synced
            calls = []

            def full_after_two(path, write):
                calls.append(path)
                if len(calls) > 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(path, write)

            monkeypatch.setattr(trunk_files, "_write_synced", full_after_two)
        with pytest.raises(OSError) as err:
            run(tiny_trunk, bank, images, out)
        assert err.value.errno == errno.ENOSPC
        line = _tool_line(err.value)
        assert line.startswith(f"error: {out}/") and line.endswith(": No space left on device"), line
        # No partial shard is visible, and nothing is left but whole files and this job's temps.
        for shard in out.glob("part-*.parquet"):
            pq.read_metadata(shard)
        assert foreign_files(out) == []
        if mounted is not None:
            filler.unlink()
        else:
            monkeypatch.undo()
        resumed = run(tiny_trunk, bank, images, out)
        assert rows(out) == rows(clean_out)
        assert resumed["fingerprint"] == json.loads((clean_out / JOB_FILE).read_text())["fingerprint"]
        assert not list(out.glob(".vtp-*.tmp"))


def test_tool_prints_one_line_and_exits_2_for_storage_errors(tmp_path, monkeypatch, capsys):
    # A real tool entry point (Hydra and all) whose library call fails on storage.
    target = tmp_path / "out" / "part-00000.parquet"

    @tool("classify")
    def main(cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(sys, "argv", ["classify", "input=x", "output=y", f"hydra.run.dir={tmp_path}"])
    monkeypatch.delenv("VTP_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {target}: No space left on device"
