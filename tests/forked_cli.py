"""A command line run as a fresh process would run it, without paying its imports each time.

``python -m search.run`` spends six seconds or more importing torch and Lightning before it reads its first
flag, and the bad-input tests run it dozens of times. ``ForkedCli`` starts one server process that imports
the command's module once, then forks a child per invocation: the child gets its own stdout and stderr files
(file descriptors 1 and 2, so library log handlers and warnings land there too), its own environment and
working directory, calls the module's ``main(argv)`` and exits with its return code. Each child starts from
the same never-run, freshly imported state, as ``python -m`` would, so one case cannot leak into the next.

What a fork cannot show is output written while the module is imported; the tests that check the whole
process (``run_cli``) still start real ``python -m`` subprocesses for a representative few cases.
Python's multiprocessing has a fork server, but it runs Python callables and returns pickled results, not a
command's exit status and raw file-descriptor output, which is what these tests assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SERVER = r"""
import importlib, json, os, sys, tempfile
module = importlib.import_module(sys.argv[1])
for name in sys.argv[2:]:  # what the command imports once its flags parse
    importlib.import_module(name)
requests, replies = sys.stdin, sys.stdout
print("ready", file=replies, flush=True)
for line in requests:
    request = json.loads(line)
    files = [tempfile.TemporaryFile() for _ in range(2)]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, f in zip((1, 2), files):
                os.dup2(f.fileno(), fd)
            sys.stdin = open(os.devnull)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            code = module.main(request["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    out, err = [(f.seek(0), f.read().decode(errors="replace"))[1] for f in files]
    for f in files:
        f.close()
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err}),
          file=replies, flush=True)
"""


class ForkedCli:
    """``run(*args)`` returns what ``python -m <module> *args`` would: a ``CompletedProcess`` with its exit
    code, stdout and stderr. ``preload``: modules the command imports only later (after parsing its flags),
    imported once in the server too. Use as a context manager (the server process is stopped on exit)."""

    def __init__(self, module: str, cwd: Path, preload: tuple[str, ...] = ()) -> None:
        self.module, self.cwd = module, cwd
        self._server = subprocess.Popen([sys.executable, "-c", _SERVER, module, *preload], cwd=cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._server.stdout.readline()
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"the fork server for {module} did not start (exit {self._server.returncode})")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        request = {"argv": list(args), "cwd": str(self.cwd), "env": dict(os.environ)}
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        reply = self._server.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server for {self.module} died (exit {self._server.poll()})")
        result = json.loads(reply)
        return subprocess.CompletedProcess([sys.executable, "-m", self.module, *args], result["returncode"],
                                           result["stdout"], result["stderr"])

    def close(self) -> None:
        if self._server.stdin:
            self._server.stdin.close()
        try:
            self._server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()

    def __enter__(self) -> ForkedCli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
