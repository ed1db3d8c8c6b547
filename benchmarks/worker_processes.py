"""The GPU check's worker processes (``gpu_check.py``): how a worker reports a result (one
``ROW`` + JSON line, ``emit``), and how a part runs one: until it ends or its deadline passes
(``run_process``), then stopped with every process it started (``stop_process``), what went
wrong told in one line (``error_line``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from benchmarks import REPO_ROOT

ROW = "@gpu-check "  # a worker's result line: ROW + JSON


def emit(**row: object) -> None:
    """Print ``row`` as a worker's result line (``ROW`` + JSON), at once."""
    print(ROW + json.dumps(row), flush=True)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process and its children (its own session); SIGKILL to whatever of
    them is left once it has ended, or after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def error_line(text: str) -> str:
    """What went wrong, in a process's output: its last ``error:`` line, else its last
    exception (torchrun's ChildFailedError only names the rank), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and ROW not in line]
    errors = [line for line in lines if re.match(r"(\[rank \d+\] )?error:", line)]
    exceptions = [
        line
        for line in lines
        if re.match(r"[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line
    ]
    return ((errors or exceptions or lines or ["no output"])[-1])[:300]


def run_process(cmd: list[str], deadline: float, log: Path, env: dict) -> dict:
    """Run ``cmd`` (its output appended to ``log``) until it ends or ``deadline`` (monotonic)
    passes: its status (ok, failed, stopped), seconds, rows, and unless ok its error."""
    start = time.monotonic()
    with log.open("ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except BaseException as exc:  # the deadline, or Ctrl-C
            stop_process(proc)
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            rc = None
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    rows = [json.loads(line.split(ROW, 1)[1]) for line in text.splitlines() if ROW in line]
    part = {"status": {None: "stopped", 0: "ok"}.get(rc, "failed"), "rows": rows}
    part["seconds"] = time.monotonic() - start
    if rc is None:
        part["error"] = "the time budget ran out"
    elif rc != 0:
        part["error"] = f"exit status {rc}: {error_line(text)}"
    return part
