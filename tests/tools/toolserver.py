"""Run ``python -m tools.<tool> ...`` as a real process without paying its imports every time.

A tool's process spends most of its time importing torch, timm, MLflow and Hydra (about ten
seconds on 2 busy cores), and the CLI tests start dozens. The server, started once per
pytest process and environment, imports :mod:`tools.common` (which pulls all of those in)
and then, for each run, forks a child that does what ``python -m tools.<tool> args`` does:
``sys.argv`` set, the tool's module run as ``__main__`` (:func:`runpy.run_module`), the
child's own stdout, stderr, working folder and exit status. Hydra is never initialised in
the server, so each child composes its config from scratch like a fresh process; only the
interpreter's start-up and the library imports are shared.

    python -m tests.tools.toolserver      # the server: JSON requests on stdin, replies on stdout
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


def as_child(request: dict, body: Callable[[], None]) -> None:
    """In a forked child: stdin from /dev/null, stdout/stderr to the request's files, run ``body``,
    exit with its status as ``python`` would (``SystemExit``'s code, 1 and a traceback on an error)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            f = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)
        try:
            body()
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _child(request: dict) -> None:
    """In the forked child: become ``python -m tools.<tool> <args>`` and exit with its status."""
    def body() -> None:
        import runpy
        from importlib.util import find_spec

        os.chdir(request["cwd"])
        module = f"tools.{request['tool']}"
        sys.argv = [find_spec(module).origin, *request["args"]]  # what ``python -m`` puts there
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    as_child(request, body)


def _reply(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def fork_server(child: Callable[[dict], None]) -> None:
    """Serve fork requests on stdin until it closes: ``{"op": "start", ...}`` forks a child that
    runs ``child(request)`` (reply ``{"pid"}``); ``{"op": "wait", "pid", "timeout"}`` reaps it
    (reply ``{"returncode"}``, negative for a signal as with :mod:`subprocess`, null if it has not
    exited within ``timeout`` seconds; 0: just poll). On end of input, children still running
    are killed and reaped. The caller imports what its children should find imported first."""
    children: set[int] = set()
    _reply(serving=os.getpid())
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(request)
            children.add(pid)
            _reply(pid=pid)
        elif request["op"] == "wait":
            pid, deadline = request["pid"], time.monotonic() + float(request.get("timeout", 0))
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
            if done:
                children.discard(pid)
            _reply(returncode=os.waitstatus_to_exitcode(status) if done else None)
        else:
            _reply(error=f"unknown op {request['op']!r}")
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's slow teardown of torch


def serve() -> None:
    """The tool server: requests ``{"op": "start", "tool", "args", "cwd", "stdout", "stderr"}`` and
    ``{"op": "wait", ...}`` (:func:`fork_server`)."""
    import tools.common  # noqa: F401  (torch, timm, MLflow's client, Hydra: the imports paid once)

    fork_server(_child)


class ForkServer:
    """The test side of a :func:`fork_server` process: start it, ask it, close it."""

    def __init__(self, command: list[str], *, cwd: Path, env: dict[str, str], err: Path):
        self.err = open(err, "w+")
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self._line()  # {"serving": pid}: the imports are done

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError(f"the fork server exited ({self.proc.wait()}): {self.err.read()[-2000:]}")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._line()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # the server kills and reaps any child still running
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


class ToolServer(ForkServer):
    """The tool server's test side; :meth:`run` is ``subprocess.run``'s subset."""

    def __init__(self, repo: Path, env: dict[str, str]):
        self.folder = Path(tempfile.mkdtemp(prefix="toolserver-"))
        self.count = 0
        self.lock = threading.Lock()
        super().__init__([sys.executable, "-m", "tests.tools.toolserver"], cwd=repo, env=env,
                         err=self.folder / "server.err")

    def run(self, tool: str, args: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """``python -m tools.<tool> *args`` in ``cwd``, output captured as text, like ``subprocess.run``."""
        with self.lock:
            self.count += 1
            out, err = self.folder / f"run-{self.count}.out", self.folder / f"run-{self.count}.err"
            pid = self.ask(op="start", tool=tool, args=list(args), cwd=str(cwd), stdout=str(out),
                            stderr=str(err))["pid"]
            code = self.ask(op="wait", pid=pid, timeout=timeout)["returncode"]
            if code is None:
                os.kill(pid, signal.SIGKILL)
                self.ask(op="wait", pid=pid, timeout=60)
                raise subprocess.TimeoutExpired([f"tools.{tool}", *args], timeout)
        cmd = [sys.executable, "-m", f"tools.{tool}", *args]
        return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


_servers: dict[frozenset, ToolServer] = {}


def run_tool_process(repo: Path, env: dict[str, str], tool: str, args: list[str], *,
                     timeout: float) -> subprocess.CompletedProcess:
    """Run a tool as its own process through the server for ``env`` (started on first use).

    pytest sets ``PYTEST_CURRENT_TEST`` to the running test and phase: it is left out of the
    tool's environment, or every test would start (and keep) a server of its own."""
    env = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}
    key = frozenset(env.items())
    if key not in _servers:
        if not _servers:
            atexit.register(lambda: [s.close() for s in _servers.values()])
        _servers[key] = ToolServer(repo, env)
    return _servers[key].run(tool, args, cwd=repo, timeout=timeout)


if __name__ == "__main__":
    serve()
