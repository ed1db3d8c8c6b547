"""Nothing trusted that was not checked (issue 16): checksums, the previous checkpoint, one
writer per run folder, run folders named after what they hold, and one clear line (never a
traceback) for a full disk, a damaged file, a busy port, or Ctrl-C / SIGTERM at start-up."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import chat_page
import export_model
import instruction_finetuning as ift
from course.instruction_data import ChapterError
from helpers import tiny_model, tiny_model_file
from runtime import interrupts, outputs, run_config, run_folders, trainer
from runtime.model_file import find_model_file, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--smoke", "--no-judge", "--epochs", "1"]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def one_line(err: str) -> str:
    """The error output, checked to be one ``error:`` line and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A small tmpfs at ``path`` (a real full disk or read-only folder); skips without mount."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------------------
# A finished smoke run, made once; tests work on copies
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "out"
    assert ift.main([*SMOKE, "--output-dir", str(out)]) == 0
    return (out / "latest").resolve()


def copy_run(run: Path, out: Path, name: str | None = None) -> Path:
    """A copy of ``run`` in ``out`` (which ``out/latest`` then points to)."""
    target = out / (name or run.name)
    shutil.copytree(run, target)
    (target / run_folders.LOCK_FILE).unlink(missing_ok=True)
    run_folders._point_latest(out, target.name)
    return target


def interrupted_in_training(run: Path) -> None:
    """Make a finished run look like one stopped during training (the checkpoint to come)."""
    for name in run.iterdir():
        if name.name != "run-config.json" and not name.name.startswith("run-config.json"):
            name.unlink()


# --------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------


def test_a_file_read_back_carries_its_checksum_and_a_flipped_byte_is_refused(tmp_path):
    path = outputs.save_model(tiny_model(), tmp_path / "m-sft.pth")
    record = outputs.checksum_path(path)
    assert record.read_text() == f"{outputs.sha256_of(path)}  m-sft.pth\n"  # sha256sum format
    outputs.verify_file(path, "do this")  # whole: passes
    assert torch.load(path, weights_only=True)  # still a plain state dict file
    flip_byte(path)
    with pytest.raises(outputs.FileCheckError, match=r"m-sft.pth is damaged: .*; do this$"):
        outputs.verify_file(path, "do this")
    with pytest.raises(ChapterError, match="is damaged"):
        read_state_dict(path)


def test_a_crash_between_the_two_renames_leaves_a_file_that_checks(tmp_path, monkeypatch):
    path = outputs.save_json({"version": 1}, tmp_path / "a.json", checksum=True)
    real_replace = os.replace

    def crash_on_the_file(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # killed after the checksum file, before the file
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", crash_on_the_file)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_json({"version": 2}, path)
    monkeypatch.undo()
    assert outputs.read_json(path, "") == {"version": 1}  # the old file, and it checks
    outputs.save_json({"version": 3}, path)  # the checksum is kept up to date
    assert len(outputs.recorded_checksums(path)) == 1
    assert outputs.read_json(path, "") == {"version": 3}


def test_a_file_without_a_checksum_is_read_unchecked_and_json_errors_are_one_line(tmp_path):
    path = tmp_path / "made-by-hand.json"
    path.write_text('{"a": 1}')
    assert outputs.read_json(path, "") == {"a": 1}
    path.write_text("[" * 100_000 + "]" * 100_000)  # too deep for Python's JSON parser
    with pytest.raises(
        outputs.FileCheckError, match=r"not readable JSON \(nested too deeply\); fix it"
    ):
        outputs.read_json(path, "fix it")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(outputs.FileCheckError, match="is not readable JSON"):
        outputs.read_json(path, "fix it")


def test_stale_temporary_files_are_removed(tmp_path):
    for name in (".checkpoint.pt.x1y2.tmp", ".m-sft.pth.sha256.a1b2.tmp"):
        (tmp_path / name).write_text("half")
    (tmp_path / ".m-sft-hf.ab12.tmp").mkdir()  # an export being written
    (tmp_path / ".m-sft-gguf.cd34.old").mkdir()  # an export moved aside, never replaced
    (tmp_path / ".m-sft-gguf.cd34.old" / "model.gguf").write_text("earlier export")
    (tmp_path / "m-sft-hf").mkdir()
    (tmp_path / ".m-sft-hf.ef56.old").mkdir()  # moved aside and replaced: no longer needed
    (tmp_path / "keep.tmp").write_text("")  # not ours: not hidden
    (tmp_path / run_folders.LOCK_FILE).write_text("")
    removed = outputs.remove_stale_temp_files(tmp_path)
    assert len(removed) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "keep.tmp",
        "m-sft-gguf",
        "m-sft-hf",
    ]
    assert (tmp_path / "m-sft-gguf" / "model.gguf").read_text() == "earlier export"


# --------------------------------------------------------------------------------------
# Checkpoints: one previous kept, damage detected, a full disk
# --------------------------------------------------------------------------------------


def _load(path: Path) -> tuple[trainer.TrainState, torch.nn.Module]:
    model = tiny_model(99)
    state, _ = trainer.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    return state, model


def _save(path: Path, seed: int, step: int) -> torch.nn.Module:
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters())
    shuffle = {"epoch_start": None, "now": None}
    trainer.save_checkpoint(path, model, optimizer, trainer.TrainState(global_step=step), shuffle)
    return model


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    _save(path, seed=1, step=4)
    _save(path, seed=2, step=9)
    _save(path, seed=3, step=14)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.prev.pt",
        "checkpoint.prev.pt.sha256",
        "checkpoint.pt",
        "checkpoint.pt.sha256",
    ]  # one previous checkpoint, no more
    assert _load(path)[0].global_step == 14
    flip_byte(path)
    state, model = _load(path)
    assert state.global_step == 9  # the previous checkpoint, and it says so
    said = capsys.readouterr().out
    assert "checkpoint.pt is damaged" in said and "resuming from the previous checkpoint" in said
    flip_byte(tmp_path / "checkpoint.prev.pt")
    with pytest.raises(ChapterError, match=r"checkpoint.pt is damaged"):
        _load(path)


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())  # what an unsafe pickle would run


@pytest.mark.parametrize("kind", ["empty", "random", "pickle payload", "folder", "not a dict"])
def test_a_broken_checkpoint_is_one_clear_error(tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "pickle payload":
        torch.save({"model": _Payload()}, path)
    elif kind == "folder":
        path.mkdir()
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(ChapterError, match=r"checkpoint.pt is not a usable checkpoint") as exc:
        _load(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("real", [True, False], ids=["tmpfs", "simulated"])
def test_a_full_disk_during_a_checkpoint_save_says_no_space_and_keeps_the_last(
    tmp_path, monkeypatch, real
):
    folder = tmp_path / "disk"
    with tmpfs(folder, "600k") if real else contextlib.nullcontext(folder.mkdir()):
        path = folder / "checkpoint.pt"
        model = tiny_model(1)  # a checkpoint of about 250 kB: two fit, three do not
        optimizer = torch.optim.AdamW(model.parameters())
        shuffle = {"epoch_start": None, "now": None}
        trainer.save_checkpoint(path, model, optimizer, trainer.TrainState(global_step=1), shuffle)
        if not real:

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(torch, "save", full)
        big = torch.nn.Linear(400, 400)  # more than the disk has left
        with pytest.raises(outputs.OutputError, match="no space left on the device") as exc:
            trainer.save_checkpoint(
                path, big, torch.optim.AdamW(big.parameters()), trainer.TrainState(), shuffle
            )
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
        monkeypatch.undo()
        assert _load(path)[0].global_step == 1  # the last checkpoint is whole
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("real", [True, False], ids=["read-only-tmpfs", "simulated"])
def test_export_into_a_read_only_folder_or_a_full_disk_is_one_line(
    tmp_path, capsys, monkeypatch, real
):
    model = tiny_model_file(tmp_path / "run")
    folder = tmp_path / "ro"
    with tmpfs(folder, "1m", read_only=True) if real else contextlib.nullcontext(folder.mkdir()):
        if not real:
            real_mkdtemp = outputs.tempfile.mkdtemp

            def read_only(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr(export_model, "check_writable_folder", lambda *a: None)
            monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
        rc = export_model.main(
            ["--model", str(model), "--format", "hf", "--output", str(folder / "x")]
        )
        line = one_line(capsys.readouterr().err)
        assert rc == 2 and ("cannot be written" in line or "read-only" in line), line
        if not real:
            monkeypatch.setattr(outputs.tempfile, "mkdtemp", real_mkdtemp)
    with tmpfs(tmp_path / "small", "200k"):  # a real full disk (skips without mount)
        rc = export_model.main(
            ["--model", str(model), "--format", "hf", "--output", str(tmp_path / "small" / "x")]
        )
        line = one_line(capsys.readouterr().err)
        assert rc == 2 and "no space left on the device" in line, line
        assert list((tmp_path / "small").iterdir()) == []  # nothing half-written is left


# --------------------------------------------------------------------------------------
# Run folders: one writer, unique names, named after what they hold, latest
# --------------------------------------------------------------------------------------


def test_two_run_folders_in_the_same_second(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(run_folders.datetime, "datetime", Frozen)
    # another process creates the name between our look and our mkdir: looking says nothing
    monkeypatch.setattr(Path, "exists", lambda self: False)
    first = run_folders.new_run_folder(tmp_path, "smoke")
    second = run_folders.new_run_folder(tmp_path, "smoke")
    monkeypatch.undo()
    assert (first.name, second.name) == ("20260102-030405-smoke", "20260102-030405-smoke-2")
    assert (tmp_path / "latest").resolve() == second


def test_a_temporary_latest_link_left_by_a_killed_process_is_removed(tmp_path):
    """``_point_latest`` makes ``.latest-PID`` and renames it; a kill in between leaves it.
    The next pointing of that link removes those of dead processes, never a live one's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, link in ((dead.pid, "latest"), (alive.pid, "latest"), (dead.pid, "latest-dpo")):
            (tmp_path / f".{link}-{pid}").symlink_to("gone", target_is_directory=True)
        run = run_folders.new_run_folder(tmp_path, "smoke")
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left == [f".latest-{alive.pid}", f".latest-dpo-{dead.pid}"]
        assert (tmp_path / "latest").resolve() == run
        run_folders.new_run_folder(tmp_path, "dpo", link="latest-dpo")
        assert not (tmp_path / f".latest-dpo-{dead.pid}").is_symlink()
    finally:
        alive.kill()
        alive.wait()


def test_run_folders_are_named_after_what_they_hold(tmp_path):
    from course.exercises import variant_settings

    names = {}
    for variant in ("baseline", "phi3_prompt", "mask_instructions", "alpaca_52k", "lora"):
        settings = variant_settings(variant, smoke=True, output_dir=tmp_path)
        names[variant] = run_config.run_tag(run_config.make_config(smoke=True, **settings))
    assert names["baseline"] == "smoke"
    assert names["lora"] == "smoke-lora16" and names["phi3_prompt"] == "smoke-phi3"
    assert names["mask_instructions"] == "smoke-mask"
    assert names["alpaca_52k"].startswith("smoke-alpaca")
    assert len(set(names.values())) == 5
    assert run_config.run_tag(run_config.RunConfig()) == "gpt2-medium355M"
    lora = run_config.RunConfig(lora_rank=8, model_size="124M")
    assert run_config.run_tag(lora) == "gpt2-small124M-lora8"


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from runtime import run_folders; run_folders.lock_run(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_run_folder_has_one_writer_and_a_killed_one_leaves_no_lock(
    finished_run, tmp_path, capsys
):
    run = copy_run(finished_run, tmp_path / "out")
    (run / "run-summary.json").unlink()  # a run to finish
    holder = _hold_lock(run)
    try:
        assert ift.main(["--resume", str(run)]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"pid {holder.pid}" in line and "another process" in line, line
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert ift.main(["--resume", str(run)]) == 0  # the lock died with it
    assert (run / "run-summary.json").is_file()


def test_resume_removes_stale_temp_files_and_says_which_run_it_took(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    run = copy_run(finished_run, out)
    (run / "run-summary.json").unlink()
    stale = run / ".gpt-random-init-sft.pth.k3j2.tmp"
    stale.write_bytes(b"half a model")
    assert ift.main(["--resume", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not stale.exists() and f"Removed {stale.name}" in printed
    assert f"the latest run in {out}/ is {run.name}" in printed


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("empty", "not a usable checkpoint"),
        ("random", "not a usable checkpoint"),
        ("pickle payload", "not a usable checkpoint"),
        ("flipped byte", "is damaged"),
        ("folder", "is not a file"),
    ],
)
def test_resume_with_a_broken_checkpoint_is_one_line(
    finished_run, tmp_path, capsys, kind, expected
):
    run = copy_run(finished_run, tmp_path / "out")
    interrupted_in_training(run)
    path = run / "checkpoint.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(10_000))
    elif kind == "pickle payload":
        path.write_bytes(pickle.dumps(_Payload(), protocol=2))
    elif kind == "flipped byte":
        model = tiny_model(1)
        trainer.save_checkpoint(
            path, model, torch.optim.AdamW(model.parameters()), trainer.TrainState(), {}
        )
        flip_byte(path)
    else:
        path.mkdir()
    assert ift.main(["--resume", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "checkpoint.pt" in line and expected in line, line
    assert "Initial training loss" not in capsys.readouterr().out  # nothing was trained


@pytest.mark.parametrize("damage", ["flipped byte", "random bytes"])
def test_resume_with_a_damaged_final_model_is_one_line(finished_run, tmp_path, capsys, damage):
    run = copy_run(finished_run, tmp_path / "out")
    (run / "run-summary.json").unlink()
    model = run / "gpt-random-init-sft.pth"
    if damage == "flipped byte":
        flip_byte(model)
    else:
        model.write_bytes(os.urandom(1000))
        outputs.checksum_path(model).unlink()
    assert ift.main(["--resume", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "gpt-random-init-sft.pth" in line, line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda saved: {**saved, "epochs": "two"}, 'epochs must be int but is "two"'),
        (lambda saved: {**saved, "colour": 1}, "unknown setting 'colour'"),
        (lambda saved: [saved], "does not hold a run's settings"),
        (lambda saved: "deep", "nested too deeply"),
    ],
)
def test_resume_with_a_bad_run_config_is_one_line(finished_run, tmp_path, capsys, change, expected):
    run = copy_run(finished_run, tmp_path / "out")
    path = run / "run-config.json"
    saved = change(json.loads(path.read_text()))
    text = "[" * 50_000 + "]" * 50_000 if saved == "deep" else json.dumps(saved)
    path.write_text(text)
    outputs.checksum_path(path).unlink()  # edited by hand
    assert ift.main(["--resume", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "run-config.json" in line and expected in line, line
    # an edit that leaves the checksum beside it is refused as a damaged file
    outputs.save_json(
        {**json.loads((finished_run / "run-config.json").read_text())}, path, checksum=True
    )
    path.write_text(path.read_text().replace('"epochs": 1', '"epochs": 7'))
    assert ift.main(["--resume", str(run)]) == 2
    assert "run-config.json is damaged" in one_line(capsys.readouterr().err)


def test_latest_without_a_model_looks_back_and_says_which_run(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    older = copy_run(finished_run, out, "20200101-000000-smoke")
    failed = out / "20300101-000000-smoke"  # the newest run stopped before saving a model
    failed.mkdir()
    run_folders._point_latest(out, failed.name)
    found = find_model_file(out)
    assert found == older / "gpt-random-init-sft.pth"
    err = capsys.readouterr().err
    assert f"latest run, {failed.name}, holds no model file" in err and str(found) in err
    run_folders._point_latest(out, older.name)
    assert find_model_file(out) == found
    assert f"Using the latest run's model: {found}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The chat page's port; Ctrl-C and SIGTERM
# --------------------------------------------------------------------------------------


def test_chat_page_on_a_busy_port_is_one_line_with_a_working_hint(tmp_path, capsys):
    model = tiny_model_file(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert chat_page.main(["--model", str(model), "--port", str(port)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "--port" in line, line
    assert "GRADIO_SERVER_PORT" not in line
    assert chat_page.main(["--model", str(model), "--port", "70000"]) == 2
    assert "out of range" in one_line(capsys.readouterr().err)


def test_sigterm_outside_training_is_an_interrupt():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        interrupts.handle_interrupts()
        with pytest.raises(KeyboardInterrupt) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert interrupts.describe(exc.value) == "terminated (SIGTERM)"
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("after", [0.4, 1.5])
def test_a_signal_during_start_up_is_one_line_and_130(tmp_path, signum, after):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "main")])}
    command = [sys.executable, str(ROOT / "main" / "instruction_finetuning.py"), *SMOKE]
    child = subprocess.Popen(
        [*command, "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(after)
    child.send_signal(signum)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    line = one_line(err)
    assert "interrupted" in line or "terminated" in line, line


def test_sigterm_while_answering_the_test_set_is_one_line(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "out")
    for name in ("run-summary.json", "instruction-data-with-response.json"):
        (run / name).unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "main")])}
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "main" / "instruction_finetuning.py"), "--resume", str(run)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in child.stdout:  # after training was found finished, before the responses
        if "Training finished in an earlier session" in line:
            child.send_signal(signal.SIGTERM)
            break
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert f"--resume {run}" in err


def test_export_finds_the_latest_usable_model(finished_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "outputs"
    older = copy_run(finished_run, out, "20200101-000000-smoke")
    failed = out / "20300101-000000-smoke-lora16"
    failed.mkdir()
    run_folders._point_latest(out, failed.name)
    monkeypatch.chdir(tmp_path)
    assert export_model.main(["--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert f"using the newest run that does: outputs/{older.name}/gpt-random-init-sft.pth" in err
    assert (tmp_path / "hf" / "config.json").is_file()


def test_replace_keeps_config_fields_typed():
    cfg = replace(run_config.RunConfig(), epochs=3)
    assert run_config._matches(cfg.epochs, int) and not run_config._matches("3", int)
    assert run_config._matches(None, int | None) and run_config._matches(1, float)
    assert not run_config._matches(True, int) and not run_config._matches(1.5, int)


COMMANDS = sorted(
    path.name for path in (ROOT / "main").glob("*.py") if "__main__" in path.read_text()
)


@pytest.mark.parametrize("script", COMMANDS)
def test_ctrl_c_while_any_command_starts_is_one_line(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "main")])}
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "main" / script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)  # (importing PyTorch alone takes longer)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    assert "interrupted" in one_line(err)
