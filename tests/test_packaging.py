"""The package lists every module: an installed wheel imports what the repository does."""

from __future__ import annotations

import pytest

from helpers import REPO_ROOT

PACKAGES = ("course", "runtime")  # the library: chapter 7's course layer, the machinery

PACKAGES = ("course", "runtime")  # the library: chapter 7's course layer, the machinery

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")


def test_the_wheel_includes_every_module_and_ruff_knows_them_as_first_party() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    included = set(config["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"])
    modules = {p.name for p in REPO_ROOT.glob("*.py")}
    for folder in ("main", *PACKAGES):
        modules |= {f"{folder}/{p.name}" for p in (REPO_ROOT / folder).glob("*.py")}
    assert included == modules
    first_party = set(config["tool"]["ruff"]["lint"]["isort"]["known-first-party"])
    top_level = {name.removesuffix(".py") for name in modules if name.count("/") == 0}
    commands = {name[5:].removesuffix(".py") for name in modules if name.startswith("main/")}
    assert top_level | commands | set(PACKAGES) <= first_party


def test_every_command_line_script_has_a_console_script_that_points_at_its_main() -> None:
    import importlib

    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    with_main = {
        p.stem
        for p in (REPO_ROOT / "main").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")
    }
    assert with_main == {target.split(":")[0] for target in scripts.values()}
