"""benchmarks/revisions.py (an old revision's code against the working tree) on a tiny model:
the revision HEAD against the working tree, its refusals, and a worker that fails."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import previous_chapters as pc
from benchmarks import REPO_ROOT, revisions
from benchmarks.revision_worker import random_params


def is_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True)
    return out.returncode == 0


needs_git = pytest.mark.skipif(
    not is_git_checkout(), reason="needs git and the project as a git checkout"
)


def worktrees() -> str:
    return subprocess.run(
        ["git", "worktree", "list"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout


@needs_git
def test_head_against_the_working_tree_gives_both_rows_and_the_same_numbers(tmp_path, capsys):
    args = ["--base", "HEAD", "--tiny", "--threads", "1", "--out", str(tmp_path)]
    assert revisions.main(args) == 0
    r = json.loads((tmp_path / "revisions-cpu-tiny.json").read_text())
    table = (tmp_path / "revisions-cpu-tiny.md").read_text()
    assert "| Training step, batch 8: non-padding tokens/s |" in table
    assert "| Greedy generation, 2 prompts x 4 tokens: new tokens/s |" in table
    assert "Training step" in capsys.readouterr().out  # the table is printed too
    for name in ("base", "current"):
        assert r["train_step"][name]["tokens_per_s"] > 0
        assert r["generation"][name]["tokens_per_s"] > 0
        assert len(r["generation"][name]["seconds"]) == revisions.TINY.gen_rounds
    assert r["first_batch_loss"]["base"] == r["first_batch_loss"]["current"]
    assert r["train_step"]["base"]["losses"] == r["train_step"]["current"]["losses"]
    assert r["train_step"]["max_loss_difference"] == 0
    assert r["generation"]["same_tokens"]["identical"] == 2
    # each worker ran its own tree's code; the temporary worktree is gone
    base_file = Path(r["modules"]["base"]["previous_chapters"])
    assert not base_file.is_relative_to(REPO_ROOT)
    assert Path(r["modules"]["current"]["runtime.engine"]).is_relative_to(REPO_ROOT)
    assert not base_file.exists()
    assert str(base_file.parent) not in worktrees()


@needs_git
def test_an_unknown_revision_is_refused_in_one_line(capsys):
    assert revisions.main(["--base", "no-such-revision-1f2e", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert err == "revisions.py: no revision 'no-such-revision-1f2e' in this repository\n"


def test_without_git_it_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(revisions.shutil, "which", lambda name: None)
    assert revisions.main(["--base", "HEAD", "--tiny"]) == 2
    assert capsys.readouterr().err == "revisions.py: git is not installed\n"


def test_a_worker_that_fails_is_reported_in_one_line(tmp_path):
    """A tree without the project's modules: the worker stops; its error is named. (Where
    an editable install serves previous_chapters, it is the engine that is missing.)"""
    args = revisions.parse_args(["--base", "HEAD", "--tiny", "--threads", "1"])
    cfg = pc.gpt2_config(revisions.MODEL, **revisions.TINY_CFG)
    setup, _, _ = revisions.setup_file(args, revisions.TINY, cfg, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="stopped: ModuleNotFoundError: No module named"):
        with revisions.workers({"base": empty}, setup, tmp_path):
            pass


def test_random_params_load_into_the_model_and_depend_only_on_the_seed():
    cfg = pc.gpt2_config(revisions.MODEL, **revisions.TINY_CFG)
    a, b = pc.GPTModel(cfg), pc.GPTModel(cfg)
    pc.load_weights_into_gpt(a, random_params(cfg, 1))
    pc.load_weights_into_gpt(b, random_params(cfg, 1))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(random_params(cfg, 2)["wte"], random_params(cfg, 1)["wte"])


def test_pooled_pairs_take_the_median_over_every_round_and_the_worst_check():
    from benchmarks import revisions

    def result(base, current, difference):
        return {"tokens": [100, 200], "max_loss_difference": difference,
                "base": {"seconds": base, "losses": [1.0]},
                "current": {"seconds": current, "losses": [1.0]}}  # fmt: skip

    r = revisions.pooled([result([1.0, 2.0], [1.0, 1.0], 0.0), result([1.0, 4.0], [2.0, 2.0], 0.5)])
    assert r["pairs"] == 2 and r["tokens"] == [100, 200, 100, 200]
    assert r["base"]["tokens_per_s"] == 100.0  # rates 100, 100, 100, 50
    assert r["current"]["tokens_per_s"] == 100.0  # rates 100, 200, 50, 100
    assert r["base"]["seconds"] == [1.0, 2.0, 1.0, 4.0] and r["max_loss_difference"] == 0.5


def test_pairs_below_one_are_refused_in_one_line(capsys):
    from benchmarks import revisions

    assert revisions.main(["--base", "HEAD", "--pairs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "revisions.py: --pairs must be at least 1, got 0"
