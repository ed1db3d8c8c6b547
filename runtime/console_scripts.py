"""The installed commands (``instruction-finetune``, ``chat-model`` ...): each behaves as
``python main/X.py`` does.

A console script imports the module it names before it calls anything, so the scripts point
here, at a module that imports nothing slow: ``guard_startup()`` comes first (Ctrl-C or
SIGTERM while PyTorch loads is one line and exit status 130), then the command's module is
imported and its ``main()`` runs through ``interrupts.run_command``. One function per
command, named after its module in main/ (pyproject.toml's ``[project.scripts]``).
"""

from __future__ import annotations

import importlib

from runtime import interrupts


def run(module_name: str) -> int:
    """Guard the start-up, import the command ``module_name``, run its ``main()`` through
    ``interrupts.run_command``; its exit status."""
    interrupts.guard_startup()
    module = importlib.import_module(module_name)
    return interrupts.run_command(module.main)


def instruction_finetuning() -> int:
    return run("instruction_finetuning")


def ollama_evaluate() -> int:
    return run("ollama_evaluate")


def export_model() -> int:
    return run("export_model")


def chat() -> int:
    return run("chat")


def chat_page() -> int:
    return run("chat_page")


def dpo_finetuning() -> int:
    return run("dpo_finetuning")


def preference_data() -> int:
    return run("preference_data")


def find_near_duplicates() -> int:
    return run("find_near_duplicates")


def compare_judges() -> int:
    return run("compare_judges")


def compare_models() -> int:
    return run("compare_models")


def generate_instruction_data() -> int:
    return run("generate_instruction_data")
