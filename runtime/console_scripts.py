"""The installed commands (``instruction-finetune``, ``chat-model`` ...): each behaves as
``python main/X.py`` does.

A console script imports the module it names before it calls anything, so the scripts point
here, at a module that imports nothing slow: ``guard_startup()`` comes first (Ctrl-C or
SIGTERM while PyTorch loads is one line and exit status 130), then the command's module is
imported and its ``main()`` runs through ``interrupts.run_command``. One function per
command, named after its module in main/ (pyproject.toml's ``[project.scripts]``), made by
``entry_point`` for each name in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from runtime import interrupts


def run(module_name: str) -> int:
    """Guard the start-up, import the command ``module_name``, run its ``main()`` through
    ``interrupts.run_command``; its exit status."""
    interrupts.guard_startup()
    module = importlib.import_module(module_name)
    return interrupts.run_command(module.main)


# main/'s commands; pyproject.toml's [project.scripts] names each one's entry point here
COMMANDS = (
    "instruction_finetuning",
    "ollama_evaluate",
    "export_model",
    "chat",
    "chat_page",
    "dpo_finetuning",
    "preference_data",
    "find_near_duplicates",
    "compare_judges",
    "compare_models",
    "generate_instruction_data",
)


def entry_point(module_name: str) -> Callable[[], int]:
    """The console script's function for the command ``module_name``: ``run(module_name)``."""

    def command() -> int:
        return run(module_name)

    command.__name__ = command.__qualname__ = module_name
    command.__doc__ = f"``python main/{module_name}.py``, as an installed command."
    return command


for _name in COMMANDS:  # (module attributes: an entry point imports them by name)
    globals()[_name] = entry_point(_name)
