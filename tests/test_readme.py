"""The README's commands work as written: in its order, offline, in a fresh clone.

A new user follows the README line by line. ``test_every_readme_command_runs_in_order_offline``
does the same in a clone of this checkout (with the working tree's uncommitted changes): every
command of its ``bash`` blocks runs with ``bash -c``, in order, from the clone's root, with no
way out to the internet (the proxy variables point at a closed loopback port, and so does
``OLLAMA_HOST``: no judge). A command must exit 0, or fail with one ``error:`` line about what
its own line says it needs (internet, the judge), never with a traceback. Commands whose line
says they need Ollama or GPUs are not run here. Afterwards ``git status`` of the clone must be
as before: every output went to an ignored place.

The installs are not repeated: the commands run in this test's own environment, which the
README's install command made. The quick-start's lines are checked to be exactly the documented
ones (and to start with the same virtual-environment part that ``.ci/run`` removes).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import closed_port

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
VENV = "python3 -m venv .venv && . .venv/bin/activate && "
INSTALL = "pip install torch==2.13.0 -r {} -e . && "
QUICK_START = [
    VENV + INSTALL.format("requirements.txt") + "python main/instruction_finetuning.py",
    VENV + INSTALL.format("requirements-dev.txt") + "python -m pytest",
]
NOT_RUN_HERE = ("Ollama", "GPU")  # what a line may need that this test does not have
ERROR_TOPIC = {  # what an error line must be about, for each need a command's line may state
    "internet": re.compile(r"download|internet|connect|network|resolve|offline|https?://", re.I),
    "judge": re.compile(r"judge|ollama", re.I),
}


@dataclass
class Command:
    text: str  # as run by bash (continuation lines joined)
    comment: str  # its own trailing comment and the comment lines just above it
    line: int  # where it starts in README.md

    def needs(self) -> set[str]:
        stated = " ".join(re.findall(r"needs ([^;]*)", self.comment))
        return {need for need in (*ERROR_TOPIC, *NOT_RUN_HERE) if need in stated}


def readme_commands(text: str) -> list[Command]:
    """The commands of the README's ``bash`` blocks, in order."""
    commands: list[Command] = []
    in_block, above, pending, start = False, [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, above = line.strip() == "```bash", []
            continue
        if not in_block or not line.strip():
            continue
        if line.lstrip().startswith("#"):
            above.append(line.strip())
            continue
        code, _, own = line.partition(" # ")  # the command, and its own trailing comment
        pending, start = (pending + " " + code.strip()).strip(), start or number
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(Command(pending, " ".join([*above, own]), start))
        above, pending, start = [], "", 0
    return commands


def test_the_readme_commands_are_found_with_their_needs():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert [c.text for c in commands[:2]] == QUICK_START
    assert commands[0].needs() == {"internet"}
    servers = [c.text for c in commands if "until Ctrl-C" in c.comment]
    assert servers == ["python main/chat_page.py"]
    multi = [c for c in commands if "--json_output_file" in c.text]
    assert multi and multi[0].text.startswith("python main/find_near_duplicates.py --json_file")


def test_ci_runs_the_readme_test_command_without_its_venv_part():
    """``.ci/run`` makes its own fresh environment and strips exactly this prefix."""
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"venv_prefix='{VENV}'" in ci
    assert "export TESTS_REQUIRE_SYSTEM_PROGRAMS=1" in ci


def _offline_env(clone: Path) -> dict[str, str]:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # the clone's modules, not those of the checkout this environment was installed from
        PYTHONPATH=f"{clone}{os.pathsep}{clone / 'main'}",
        PYTHONUNBUFFERED="1",
        OLLAMA_HOST=nowhere,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        MPLBACKEND="Agg",
    )
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = nowhere
    return env


def _clone(into: Path) -> Path:
    """A clone of this checkout, with the working tree's changes and new files on top."""
    clone = into / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


def _git_status(clone: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout


def _run(command: str, clone: Path, env: dict) -> tuple[int, str, str]:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return done.returncode, done.stdout, done.stderr


def _serve_then_interrupt(command: str, clone: Path, env: dict) -> tuple[int, str, str]:
    """A command that serves until Ctrl-C: wait for its address, fetch it, then Ctrl-C.

    Its output goes to files (a pipe nobody reads could fill up and stop it)."""
    out_file, err_file = clone.parent / "served.out", clone.parent / "served.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    deadline, served = time.monotonic() + 300, None
    while served is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        found = re.search(r"open (http://\S+)", out_file.read_text())
        if found:
            with urllib.request.urlopen(found[1], timeout=60) as page:  # loopback
                served = page.status
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    out, err = out_file.read_text(), err_file.read_text()
    assert served == 200, f"{command!r} never served its page:\n{out}\n{err}"
    return process.returncode, out, err


def _check(command: Command, rc: int, out: str, err: str) -> None:
    said = f"README.md:{command.line}: `{command.text}` exited {rc}:\n{out[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, said
    if rc == 0:
        return
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said
    message = err[err.index(errors[0]) :]
    assert len(message.strip().splitlines()) <= 4, said  # one line (with its hint), not a dump
    needs = command.needs() & set(ERROR_TOPIC)
    assert any(ERROR_TOPIC[need].search(message) for need in needs), said


@pytest.mark.slow
def test_every_readme_command_runs_in_order_offline(tmp_path, system_program):
    system_program("git", "sudo apt-get install -y git")
    if not (REPO_ROOT / ".git").exists():
        pytest.skip(f"{REPO_ROOT} is not a git checkout: the test runs the README in a clone")
    clone = _clone(tmp_path)
    env = _offline_env(clone)
    before = _git_status(clone)
    commands = readme_commands((clone / "README.md").read_text(encoding="utf-8"))
    ran = []
    for command in commands:
        text = command.text
        if text in QUICK_START:  # the environment exists already: run what follows the install
            text = text.split(" && ")[-1]
            if text == "python -m pytest":
                continue  # this very test suite
        assert "pip install" not in text, f"README.md:{command.line}: an install beyond the two"
        if command.needs() & set(NOT_RUN_HERE):
            continue
        if "until Ctrl-C" in command.comment:  # a server
            rc, out, err = _serve_then_interrupt(text, clone, env)
            assert rc == 130, f"{text}: Ctrl-C should exit 130, not {rc}\n{out}\n{err}"
            assert "share=True" not in out + err  # Gradio's advice, which no user can act on
            rc = 0
        else:
            rc, out, err = _run(text, clone, env)
        _check(command, rc, out, err)
        ran.append(text)
    assert len(ran) >= 10, ran  # the smoke run, the notebook, DPO, the exports, the chats...
    assert _git_status(clone) == before, "the README's commands left files git does not ignore"
