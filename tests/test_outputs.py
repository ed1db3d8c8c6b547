"""outputs.py: strict JSON, atomic writes (never a half-written file), ordinary file modes."""

from __future__ import annotations

import json
import math
import os
import stat

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

from helpers import tiny_model
from runtime import outputs

matplotlib.use("Agg")


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON parsers (browsers, jq) do."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_json_writes_strict_json(tmp_path):
    data = {
        "loss": float("nan"),
        "history": [1.5, float("inf"), -float("inf")],
        "nested": {"pair": (2.0, float("nan")), "text": "Grüße"},
        "n": 3,
    }
    path = outputs.save_json(data, tmp_path / "summary.json")
    text = path.read_text(encoding="utf-8")
    assert strict_loads(text) == {
        "loss": None,
        "history": [1.5, None, None],
        "nested": {"pair": [2.0, None], "text": "Grüße"},
        "n": 3,
    }
    assert "Grüße" in text  # not \u-escaped
    assert text == json.dumps(strict_loads(text), indent=4, ensure_ascii=False) + "\n"
    assert math.isnan(data["loss"])  # the caller's data is not changed


def test_strict_loads_refuses_what_plain_json_dumps_writes():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"loss": float("nan")}))


def test_finite_or_none_at_any_depth():
    assert outputs.finite_or_none([{"a": [float("nan"), (1.0, float("-inf"))]}]) == [
        {"a": [None, [1.0, None]]}
    ]
    assert outputs.finite_or_none(2.5) == 2.5 and outputs.finite_or_none("nan") == "nan"


def test_save_json_leaves_no_temporary_files_and_makes_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert outputs.save_json([1, 2], target) == target
    outputs.save_json([3], target)  # replacing an existing file
    assert strict_loads(target.read_text()) == [3]
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_json_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    outputs.save_json({"version": 1}, target)
    with pytest.raises(TypeError, match="not JSON serializable"):
        outputs.save_json({"version": 2, "model": object()}, target)
    assert strict_loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_interrupted_midway_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old and complete")

    def write(tmp):
        tmp.write_text("new but only half")
        raise error

    with pytest.raises(type(error)):
        outputs.write_atomically(target, write)
    assert target.read_text() == "old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_permissions_of_ordinary_files(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        path = outputs.save_json({"a": 1}, tmp_path / "a.json")
    finally:
        os.umask(previous)
    assert mode(path) == expected  # what open() would give under this umask


def test_files_are_ordinary_readable_files(tmp_path):
    previous = os.umask(0o022)
    model = tiny_model()
    fig = plt.figure()
    paths = [
        outputs.save_json({"a": 1}, tmp_path / "a.json"),
        outputs.save_figure(fig, tmp_path / "plot.png"),
        outputs.save_model(model, tmp_path / "model.pth"),
    ]
    plt.close(fig)
    os.umask(previous)
    assert [mode(p) for p in paths] == [0o644] * 3  # not mkstemp's private 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "model.pth",
        "model.pth.sha256",  # (the model is read back later: it carries its checksum)
        "plot.png",
    ]
    assert mode(outputs.checksum_path(paths[2])) == 0o644


def test_save_figure_uses_the_file_name_format(tmp_path):
    fig = plt.figure()
    png = outputs.save_figure(fig, tmp_path / "plot.png")
    pdf = outputs.save_figure(fig, tmp_path / "plot.pdf")
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_save_model_round_trips_with_weights_only(tmp_path):
    model = tiny_model(seed=3)
    path = outputs.save_model(model, tmp_path / "m.pth")
    fresh = tiny_model(seed=4)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
