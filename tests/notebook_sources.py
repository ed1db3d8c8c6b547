"""The notebooks' definitions against the modules': one truth for code shown twice.

A notebook defines in its cells the functions the chapter teaches (``format_input``,
``InstructionDataset``, ``train_model_simple`` ...), so that a learner can edit one and rerun
the cells below. Each such definition must be the module's, statement for statement (their
ASTs are compared, so comments and formatting may differ), and each parameter of a
notebook's parameters cell must be declared as ``run_settings.parameter_line`` writes it.

    python tests/notebook_sources.py                 # list what differs, in every notebook
    python tests/notebook_sources.py --sync          # copy the modules' versions into the cells
                                                     # (and the settings' into the parameters)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [REPO_ROOT / "main" / name for name in ("main.ipynb", "exercises.ipynb", "dpo.ipynb")]
# where a notebook's definitions come from, searched in this order
MODULES = (
    "course.instruction_data",
    "course.collate_drafts",
    "previous_chapters",
    "course.pretraining",
    "course.finetuning",
    "runtime.engine",
    "ollama_evaluate",
    "course.lora",
    "course.dpo",
    "preference_data",
)


@dataclass
class CellDefinition:
    """A top-level function or class defined in a notebook's code cell."""

    cell: int  # the index among all cells
    name: str
    node: ast.AST
    first_line: int  # 1-based, decorators included
    last_line: int


def _top_level_definitions(source: str) -> list[ast.AST]:
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node for node in ast.parse(source).body if isinstance(node, defs)]


def cell_definitions(nb: Any) -> list[CellDefinition]:
    """Every function and class the notebook's code cells define, in order."""
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for node in _top_level_definitions(cell.source):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found.append(CellDefinition(index, node.name, node, first, node.end_lineno))
    return found


def module_definition(name: str) -> tuple[str, ast.AST, str] | None:
    """(module name, AST, source) of the first module in ``MODULES`` that defines ``name``."""
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        for node in _top_level_definitions(source):
            if node.name == name:
                return module_name, node, ast.get_source_segment(source, node, padded=False)
    return None


def _with_decorators(node: ast.AST, source: str) -> str:
    lines = source.splitlines()
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return "\n".join(lines[first - 1 : node.end_lineno])


def same_code(a: ast.AST, b: ast.AST) -> bool:
    """Whether two definitions are the same code (positions and comments aside)."""
    return ast.dump(a) == ast.dump(b)


def differences(path: Path) -> list[str]:
    """One line for each definition in the notebook at ``path`` that is not its module's
    (a helper of the notebook's own, defined in no module, is not listed)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for definition in cell_definitions(nb):
        found = module_definition(definition.name)
        if found is not None and not same_code(definition.node, found[1]):
            where = f"{path.name} cell {definition.cell}: {definition.name}"
            problems.append(f"{where} differs from {found[0]}.{definition.name}")
    return problems


def sync(path: Path) -> list[str]:
    """Copy each module's version of a differing definition into the notebook's cell;
    returns what was replaced."""
    nb = nbformat.read(path, as_version=4)
    replaced = []
    for definition in reversed(cell_definitions(nb)):  # (bottom up: line numbers stay valid)
        found = module_definition(definition.name)
        if found is None or same_code(definition.node, found[1]):
            continue
        module_name, node, _ = found
        module_source = inspect.getsource(importlib.import_module(module_name))
        lines = nb.cells[definition.cell].source.splitlines()
        new = _with_decorators(node, module_source).splitlines()
        lines[definition.first_line - 1 : definition.last_line] = new
        nb.cells[definition.cell].source = "\n".join(lines)
        replaced.append(f"{path.name} cell {definition.cell}: {module_name}.{definition.name}")
    if replaced:
        nbformat.write(nb, path)
    return replaced


def parameters_cell(nb: Any) -> str:
    """The source of the notebook's cell tagged ``parameters``."""
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0].source


# each notebook's config class, and the parameters that mean something else there
PARAMETERS = {
    "main.ipynb": ("runtime.run_config", "RunConfig", frozenset()),
    "exercises.ipynb": ("runtime.run_config", "RunConfig", frozenset({"LORA_RANK", "LORA_ALPHA"})),
    "dpo.ipynb": ("runtime.dpo_config", "DPOConfig", frozenset()),
}


def _wanted_parameter_lines(nb: Any, config_class: type, smoke: Any, own: frozenset[str]):
    """(line, the line as ``run_settings.parameter_line`` writes it) of each setting's
    parameter (``smoke``: the smoke preset; ``own``: parameters of the notebook's own)."""
    from runtime.run_settings import definitions, param_name, parameter_line

    by_param = {param_name(name, d): name for name, d in definitions(config_class)}
    for line in parameters_cell(nb).splitlines():
        match = re.match(r"([A-Z_]+) = ", line)
        if match and match.group(1) in by_param and match.group(1) not in own:
            name = by_param[match.group(1)]
            yield line, parameter_line(config_class, name, getattr(smoke, name))


def parameter_differences(
    nb: Any, config_class: type, smoke: Any, own: frozenset[str] = frozenset()
) -> list[str]:
    """The parameter lines that do not read as their settings' definitions say."""
    return [
        f"{line!r} should read {wanted!r}"
        for line, wanted in _wanted_parameter_lines(nb, config_class, smoke, own)
        if line != wanted
    ]


def _config_of(path: Path) -> tuple[type, frozenset[str]]:
    module, class_name, own = PARAMETERS[path.name]
    return getattr(importlib.import_module(module), class_name), own


def parameter_report(path: Path) -> list[str]:
    """``parameter_differences`` of the notebook at ``path``, named."""
    config_class, own = _config_of(path)
    nb = nbformat.read(path, as_version=4)
    found = parameter_differences(nb, config_class, config_class.smoke_preset(), own)
    return [f"{path.name}: {line}" for line in found]


def sync_parameters(path: Path) -> list[str]:
    """Rewrite the parameter lines of the notebook at ``path`` from the settings'
    definitions; returns the lines replaced."""
    config_class, own = _config_of(path)
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    wanted = dict(_wanted_parameter_lines(nb, config_class, config_class.smoke_preset(), own))
    cell.source = "\n".join(wanted.get(line, line) for line in cell.source.splitlines())
    changed = [f"{path.name}: {new}" for old, new in wanted.items() if old != new]
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", action="store_true", help="copy the modules' versions in")
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS)
    args = parser.parse_args(argv)
    found = []
    for path in args.notebooks:
        if args.sync:
            found += sync(path) + sync_parameters(path)
        else:
            found += differences(path) + parameter_report(path)
    print("\n".join(found) or "the notebooks agree with the modules and the settings")
    return 1 if found and not args.sync else 0


if __name__ == "__main__":  # (the modules import as the README's install makes them)
    sys.exit(main())
