"""One folder per run, and one process writing it.

``new_run_folder`` makes ``OUTPUT_DIR/<date>-<time>-<tag>/`` (numbered if the name is taken)
and points ``OUTPUT_DIR/latest`` (or another link) at it; ``run_folders`` and ``latest_run``
find the runs again. ``lock_run`` makes a process the folder's only writer until it exits or
calls ``release_run``. The chapter's runs (``run_config.start_run``) and DPO's
(``dpo_config``) both keep their folders here.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from runtime.errors import ConfigError, RunLockedError

_RUN_NAME = re.compile(r"^\d{8}-\d{6}-")  # <date>-<time>-<tag>, as new_run_folder names them
LOCK_FILE = ".lock"  # held (flock) by the process that writes the run; it holds the pid
_LOCKS: dict[Path, int] = {}  # the run folders this process holds: their lock files' fds


def lock_run(folder: str | os.PathLike) -> None:
    """Make this process the only writer of ``folder`` until it exits (or ``release_run``).

    The lock is the operating system's (``flock``) on ``folder/.lock``, so a process that
    crashes or is killed cannot leave it stuck. A folder another live process holds raises
    ``RunLockedError`` naming that process. (Without ``fcntl``, as on Windows: no lock.)
    """
    key = Path(folder).resolve()
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot lock the run folder {folder} ({exc.strerror or exc}); check that it "
            "exists and that you can write in it"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{folder} is being written by another process (pid {holder}); wait for it to "
            f"end or stop it (kill {holder}), then try again; or start a new run"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def release_run(folder: str | os.PathLike) -> None:
    """Let other processes write ``folder`` again (a no-op if this process does not hold it)."""
    fd = _LOCKS.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # (closing the file releases the flock)


def run_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The run folders in ``output_dir``, newest first (by the date and time in their names)."""
    out = Path(output_dir)
    found = [p for p in out.iterdir() if _RUN_NAME.match(p.name)] if out.is_dir() else []
    return sorted((p for p in found if p.is_dir() and not p.is_symlink()), reverse=True)


def latest_run(output_dir: str | os.PathLike, *, link: str = "latest") -> Path | None:
    """The newest run folder in ``output_dir`` (what ``latest``, or ``link``, points to), or
    None."""
    out = Path(output_dir)
    path, note = out / link, out / f"{link}.txt"
    if path.is_dir():
        return path.resolve()
    if note.is_file():
        return out / note.read_text(encoding="utf-8").strip()
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's process: it exists)
        return True
    return True


def remove_stale_links(out: Path, link: str = "latest") -> list[Path]:
    """Delete the temporary ``.<link>-PID`` links that ``_point_latest`` of a process that
    no longer runs left in ``out`` (it was killed between making one and renaming it)."""
    pattern, removed = re.compile(rf"^\.{re.escape(link)}-(\d+)$"), []
    for path in out.glob(f".{link}-*"):
        match = pattern.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _point_latest(out: Path, name: str, link: str = "latest") -> None:
    """Make ``out/latest`` (``out/<link>``) a link to the run folder ``name`` (or write
    latest.txt without links); stale temporary links of killed processes are removed."""
    remove_stale_links(out, link)
    tmp = out / f".{link}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name, target_is_directory=True)
        os.replace(tmp, out / link)
    except OSError:  # no symbolic links here (e.g. Windows without developer mode)
        tmp.unlink(missing_ok=True)
        (out / f"{link}.txt").write_text(f"{name}\n", encoding="utf-8")


def new_run_folder(output_dir: str | os.PathLike, tag: str, *, link: str = "latest") -> Path:
    """A new, empty folder ``output_dir/<date>-<time>-<tag>/`` (numbered if the name is
    taken, even by a process starting in the same second), locked for this process
    (``lock_run``), which ``output_dir/<link>`` then points to."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = f"{stamp}-{tag}", 2
    while True:
        try:
            (out / name).mkdir()  # (creating it is the test: no other process can have it)
            break
        except FileExistsError:
            name, n = f"{stamp}-{tag}-{n}", n + 1
    lock_run(out / name)
    _point_latest(out, name, link)
    return out / name
