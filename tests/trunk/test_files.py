"""trunk.files: the one atomic-write helper (temp + fsync + rename or link)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trunk import files
from trunk.files import atomic_write, fsync_dir, temp_path, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
TEMP = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{8}\.tmp")


@pytest.fixture
def fsynced(monkeypatch):
    """Wraps ``os.fsync`` (the one fault injection): records ``(inode, is_dir)`` of every fd synced."""
    real = os.fsync
    seen: list[tuple[int, bool]] = []

    def wrapper(fd):
        st = os.fstat(fd)
        seen.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", wrapper)
    return seen


def test_exclusive_commit_loses_to_an_existing_name(tmp_path):
    target = tmp_path / "f.bin"
    assert atomic_write(target, lambda f: f.write(b"first"), exclusive=True)
    before = os.stat(target)
    assert not atomic_write(target, lambda f: f.write(b"second"), exclusive=True)
    assert target.read_bytes() == b"first" and os.stat(target).st_ino == before.st_ino
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp left behind


def test_replace_overwrites_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    assert atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


def test_a_reader_never_sees_a_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old content")
    seen_midway = []

    def write(f):
        f.write(b"half of the new")
        f.flush()
        seen_midway.append(target.read_bytes())  # what a reader sees during the write
        raise RuntimeError("writer died midway")

    with pytest.raises(RuntimeError, match="midway"):
        atomic_write(target, write)
    assert seen_midway == [b"old content"]
    assert target.read_bytes() == b"old content" and os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(RuntimeError, match="midway"):
        atomic_write(tmp_path / "g.bin", write, exclusive=True)
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_killed_writer_leaves_the_old_file_and_only_a_dot_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old content")
    script = ("import os, signal, sys\nfrom trunk.files import atomic_write\n"
              "def write(f):\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "atomic_write(sys.argv[1], write)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT, capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert target.read_bytes() == b"old content"
    leftovers = sorted(set(os.listdir(tmp_path)) - {"f.bin"})
    assert len(leftovers) == 1 and TEMP.fullmatch(leftovers[0]) and leftovers[0].startswith(".f.bin.")


@pytest.mark.parametrize("exclusive", [False, True])
def test_fsyncs_the_file_and_its_folder(tmp_path, fsynced, exclusive):
    target = tmp_path / "f.bin"
    assert atomic_write(target, lambda f: f.write(b"x"), exclusive=exclusive)
    # The file's data before its name, then the folder so the new name is durable.
    assert fsynced == [(target.stat().st_ino, False), (tmp_path.stat().st_ino, True)]


def test_a_failed_fsync_names_the_temp_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        atomic_write(target, lambda f: f.write(b"new"))
    assert err.value.errno == 28 and TEMP.fullmatch(Path(err.value.filename).name)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_temp_files_carry_the_given_prefix(tmp_path):
    names = []
    atomic_write(tmp_path / "part-00000.parquet", lambda f: names.append(os.path.basename(f.name)),
                 temp_prefix=".vtp-0123456789abcdef.")
    assert re.fullmatch(rf"\.vtp-0123456789abcdef\.part-00000\.parquet\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", names[0])
    assert TEMP.fullmatch(temp_path(tmp_path / "x.json").name)


def test_write_json_atomic(tmp_path):
    target = tmp_path / "a.json"
    assert write_json_atomic(target, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert target.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1, sort_keys=True) + "\n"
    assert not write_json_atomic(target, {"other": 1}, exclusive=True)
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "b.json", {"x": object()})
    assert os.listdir(tmp_path) == ["a.json"]
    write_json_atomic(tmp_path / "c.json", {"x": Path("/p")}, default=str)
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": "/p"}


def test_fsync_dir_of_a_missing_folder_is_a_no_op(tmp_path):
    fsync_dir(tmp_path / "absent")


def test_trunk_save_commits_both_files_atomically(tmp_path, fsynced):
    from trunk.model import SPEC_FILE, WEIGHTS_FILE, Trunk

    trunk = Trunk("test_resnet", data_config={"input_size": [3, 32, 32]})
    trunk.save(tmp_path)
    inodes = {ino for ino, is_dir in fsynced if not is_dir}
    assert {(tmp_path / WEIGHTS_FILE).stat().st_ino, (tmp_path / SPEC_FILE).stat().st_ino} <= inodes
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHTS_FILE, SPEC_FILE])
    assert Trunk.load(tmp_path).trunk_id == trunk.trunk_id


def test_no_plain_json_writes_left_in_the_platform():
    # Every JSON file the platform commits goes through trunk.files; the one exception is a
    # file written into a private temp folder and uploaded to MLflow (named in its docstring).
    uploaded_from_a_temp_dir = {"registry/store/releases.py"}
    plain = re.compile(r"write_text\(\s*json\.dumps|json\.dump\(|write_bytes\(\s*json\.dumps")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for folder in ("trunk", "heads", "registry", "benchmarks", "demo")
                 for p in sorted((ROOT / folder).rglob("*.py"))
                 if str(p.relative_to(ROOT)) not in uploaded_from_a_temp_dir
                 for n, line in enumerate(p.read_text().splitlines(), 1) if plain.search(line)]
    assert offenders == []
    assert "release manifest" in (files.__doc__ or "")
