"""Instruction data written by a local LLM, Magpie-style, in the chapter's Alpaca format.

    python main/generate_instruction_data.py --model llama3 --num_entries 200 \\
        --output outputs/generated.json [--url URL --api ollama|openai] [--template llama3]
    python main/instruction_finetuning.py --data outputs/generated.json

Magpie (Xu et al., 2024): an instruction-tuned model given only the start of a user turn in
its chat template (for Llama 3, ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>``)
goes on to write what a user would ask. That text becomes the instruction; the model then
answers it in a complete chat turn. Both steps are raw text completions (``complete_text``:
Ollama's ``/api/generate`` with ``raw``, or an OpenAI-compatible ``/v1/completions``), so
the template is the one named by ``--template`` and nothing else is added.

Every entry is checked before it is kept: not empty, not cut off by the token limit, not
holding the template's own markers, and not a near-duplicate of a kept instruction (the
project's ``find_near_duplicates``, TF-IDF cosine above ``--threshold``). Kept entries are saved
to ``--output`` as they arrive (atomically), rejected attempts with their reason beside it in
``<output>.rejected.json``; a rerun continues with the next attempt. Attempt k uses seed
``--seed`` + k, so a rerun writes what an uninterrupted run would have.

``--reflect``: the model critiques each instruction and rewrites it, then critiques the answer
to it and rewrites that. The entry keeps the improved text as its instruction and output, and
the first version under ``original`` (with the critiques), so the two can be compared.
"""

from __future__ import annotations

from runtime import interrupts

interrupts.guard_startup(__name__)  # before the slow imports: Ctrl-C there is one line too

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from course.instruction_data import PROMPT_STYLES, ChapterError, ConfigError, DatasetError
from find_near_duplicates import entry_pairs
from ollama_evaluate import (
    JUDGE_APIS,
    JUDGE_MAX_FAILURES,
    JUDGE_TIMEOUT,
    JudgeUnavailableError,
    check_judge,
    excerpt,
    judge_endpoint,
    split_timeout,
    with_judge_hint,
)
from runtime import judge_client
from runtime.judge_host import JudgeReplyError, judge_base, redact_url
from runtime.outputs import save_json, verify_file


@dataclass(frozen=True)
class ChatTemplate:
    """What opens a user turn, what closes it and opens the assistant's, and what ends a turn."""

    user_start: str
    assistant_start: str
    stop: tuple[str, ...]


_ALPACA, _PHI3 = PROMPT_STYLES["alpaca"], PROMPT_STYLES["phi3"]
TEMPLATES = {
    "llama3": ChatTemplate(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
    # the chapter's own templates: what a model fine-tuned here (and exported) was trained on
    "alpaca": ChatTemplate(_ALPACA.header, _ALPACA.response_sep, ("\n\n###", "<|endoftext|>")),
    "phi3": ChatTemplate(_PHI3.header, _PHI3.response_sep, ("<|assistant|>", "<|endoftext|>")),
}
Complete = Callable[..., tuple[str, str]]  # (prompt, max_tokens, seed, temperature) -> (text, why)


def complete_text(
    prompt: str,
    model: str,
    url: str | None = None,
    *,
    api: str = "ollama",
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    seed: int = 123,
    temperature: float = 0.0,
    timeout: float = JUDGE_TIMEOUT,
    key: str | None = None,
) -> tuple[str, str]:
    """The model's raw continuation of ``prompt`` (no chat template added) and why it ended:
    "stop" (its turn ended, or a ``stop`` string came) or "length" (cut at ``max_tokens``).

    ollama: POST {host}/api/generate with ``raw``; openai: POST {base}/v1/completions. Sent
    through the judge client's ``post_json`` (its time and size limits, its one-line HTTP
    errors); a reply that is not the API's JSON raises ``JudgeReplyError``, and so does a
    server without a text-completion endpoint, saying so. ``key``: default $OPENAI_API_KEY.
    """
    base = judge_base(judge_endpoint(url, api), api)
    if api == "ollama":
        target = base + "/api/generate"
        options = {"seed": seed, "temperature": temperature, "num_predict": max_tokens}
        payload = {"model": model, "prompt": prompt, "raw": True, "stream": False}
        payload["options"] = {**options, "stop": list(stop)}
    else:
        target = base + "/completions"
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": seed}
        payload.update(temperature=temperature, stop=list(stop))
    key = judge_client.api_key(api) if key is None else key
    try:
        body = b"".join(judge_client.post_json(target, payload, timeout=timeout, key=key))
    except JudgeUnavailableError as exc:
        if re.search(r"HTTP (404|405|501)\b", str(exc)):
            raise JudgeReplyError(
                f"{exc}: this server has no raw text completion, which Magpie-style generation "
                "needs (Ollama's /api/generate or an OpenAI-compatible /v1/completions)"
            ) from None
        raise
    try:
        reply = json.loads(body)
        if api == "ollama":
            return str(reply["response"]), str(reply.get("done_reason") or "stop")
        choice = reply["choices"][0]
        return str(choice["text"]), str(choice.get("finish_reason") or "stop")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        raise JudgeReplyError(
            f"{redact_url(target)} sent a reply that is not the API's JSON: {excerpt(body, 80)!r}"
        ) from None


def text_problem(text: str, finish: str, template: ChatTemplate) -> str | None:
    """Why a generated text cannot be kept (None: it can): empty, cut off, or template."""
    if not text.strip():
        return "empty"
    if finish == "length":
        return "truncated (hit the token limit)"
    markers = [template.user_start.strip(), template.assistant_start.strip(), *template.stop]
    if any(m.strip() and m.strip() in text for m in markers):
        return "holds the chat template's markers"
    return None


class Rejected(Exception):
    """One attempt's text could not be kept (``stage``: which text, ``text``: what it was)."""

    def __init__(self, stage: str, reason: str, text: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.text = stage, reason, text


CRITIQUE_INSTRUCTION = (
    "Here is an instruction for an AI assistant:\n\n{instruction}\n\n"
    "Critique it briefly: is it clear, specific, self-contained and useful? "
    "Say what should improve."
)
REWRITE_INSTRUCTION = (
    "Here is an instruction for an AI assistant:\n\n{instruction}\n\n"
    "A critique of it:\n\n{critique}\n\n"
    "Rewrite the instruction so that it answers the critique. "
    "Reply with the improved instruction only."
)
CRITIQUE_OUTPUT = (
    "Instruction:\n{instruction}\n\nAnswer:\n{output}\n\n"
    "Critique the answer briefly: is it correct and complete, does it follow the instruction, "
    "and is it concise?"
)
REWRITE_OUTPUT = (
    "Instruction:\n{instruction}\n\nAnswer:\n{output}\n\n"
    "A critique of the answer:\n\n{critique}\n\n"
    "Rewrite the answer so that it answers the critique. Reply with the improved answer only."
)


@dataclass
class Magpie:
    """The two steps of Magpie and the four of reflection, over one ``complete`` function
    (``complete_text`` with the server settings bound, or a stand-in)."""

    complete: Complete
    template: ChatTemplate
    max_tokens: int = 256
    temperature: float = 1.0  # the instruction's: varied; answers and reflection are greedy

    def _kept(self, stage: str, text: str, finish: str) -> str:
        problem = text_problem(text, finish, self.template)
        if problem is not None:
            raise Rejected(stage, problem, text)
        return text.strip()

    def turn(self, stage: str, user_text: str, seed: int) -> str:
        """The model's reply to one complete user turn."""
        prompt = self.template.user_start + user_text + self.template.assistant_start
        text, finish = self.complete(
            prompt, max_tokens=self.max_tokens, stop=self.template.stop, seed=seed, temperature=0.0
        )
        return self._kept(stage, text, finish)

    def instruction(self, seed: int) -> str:
        """The instruction the model writes after the start of a user turn (Magpie)."""
        text, finish = self.complete(
            self.template.user_start,
            max_tokens=self.max_tokens,
            stop=self.template.stop,
            seed=seed,
            temperature=self.temperature,
        )
        return self._kept("instruction", text, finish)

    def reflect(self, entry: dict, seed: int) -> dict:
        """``entry`` improved: the instruction critiqued and rewritten, then the answer; the
        first version and the critiques under ``original``."""
        first = {"instruction": entry["instruction"], "output": entry["output"]}
        critique_i = self.turn(
            "critique of the instruction", CRITIQUE_INSTRUCTION.format(**first), seed
        )
        instruction = self.turn(
            "rewritten instruction", REWRITE_INSTRUCTION.format(**first, critique=critique_i), seed
        )
        shown = {"instruction": instruction, "output": first["output"]}
        critique_o = self.turn("critique of the answer", CRITIQUE_OUTPUT.format(**shown), seed)
        output = self.turn(
            "rewritten answer", REWRITE_OUTPUT.format(**shown, critique=critique_o), seed
        )
        original = {
            **first,
            "critique_of_instruction": critique_i,
            "critique_of_output": critique_o,
        }
        return {**entry, "instruction": instruction, "output": output, "original": original}


def near_duplicate(entries: Sequence[dict], instruction: str, threshold: float) -> int | None:
    """The kept entry whose first instruction ``instruction`` nearly duplicates, or None."""
    texts = [{"instruction": e.get("original", e)["instruction"]} for e in entries]
    pairs = entry_pairs([*texts, {"instruction": instruction}], "instruction", threshold)
    return next((i for i, j, _ in pairs if j == len(texts)), None)


def _read_list(path: Path) -> list[dict]:
    """The entries saved in ``path`` by an earlier run (none: []), checked against the
    checksum recorded when they were saved (a file made by hand has none: read as it is)."""
    if not path.is_file():
        return []
    verify_file(path, "move it and its .sha256 away, or choose another --output")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path}: not a JSON file ({exc}); move it away or choose another --output"
        ) from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise DatasetError(f"{path}: not a JSON list of entries; choose another --output")
    return data


def rejected_path(output: str | os.PathLike) -> Path:
    """Where the rejected attempts of ``output`` are kept."""
    path = Path(output)
    return path.with_name(f"{path.stem}.rejected.json")


def generate_instruction_data(
    magpie: Magpie,
    output: str | os.PathLike,
    num_entries: int,
    *,
    reflect: bool = False,
    seed: int = 123,
    threshold: float = 0.9,
    max_attempts: int | None = None,
    max_failures: int = JUDGE_MAX_FAILURES,
    progress: bool = True,
) -> list[dict]:
    """Generate entries until ``output`` holds ``num_entries``; returns them.

    Each kept entry is saved at once, each rejected attempt in ``rejected_path(output)``; a
    rerun goes on from the next attempt (attempt k draws with seed ``seed + k``). With
    ``reflect``, saved entries not yet improved are improved first. At most ``max_attempts``
    attempts in all (default: 4 per entry); fewer entries than asked after them:
    ``DatasetError``. ``max_failures`` failed requests in a row: ``JudgeUnavailableError``.
    """
    from runtime.progress_bars import progress_bar

    output = Path(output)
    entries, rejected = _read_list(output), _read_list(rejected_path(output))
    done = [e.get("attempt", -1) for e in entries] + [r.get("attempt", -1) for r in rejected]
    attempt = max(done, default=-1) + 1
    limit = max_attempts if max_attempts is not None else 4 * num_entries
    failures = _Failures(max_failures)
    if reflect:
        for i, entry in enumerate(entries):
            while "original" not in entry and "reflection_error" not in entry:
                with failures:
                    entries[i] = entry = _reflected(magpie, entry, seed + entry.get("attempt", i))
            save_json(entries, output, checksum=True)
    bar = progress_bar(total=num_entries, initial=min(len(entries), num_entries), enabled=progress)
    while len(entries) < num_entries and attempt < limit:
        with failures:
            try:
                instruction = magpie.instruction(seed + attempt)
                twin = near_duplicate(entries, instruction, threshold)
                if twin is not None:
                    raise Rejected("instruction", f"near-duplicate of entry {twin}", instruction)
                answer = magpie.turn("output", instruction, seed + attempt)
                entry = {"instruction": instruction, "input": "", "output": answer}
                entry = _reflected(magpie, entry, seed + attempt) if reflect else entry
                entries.append({**entry, "attempt": attempt})
                save_json(entries, output, checksum=True)
                bar.update()
            except Rejected as exc:
                rejected.append(
                    {"attempt": attempt, "stage": exc.stage, "reason": exc.reason, "text": exc.text}
                )
                save_json(rejected, rejected_path(output), checksum=True)
            attempt += 1
    bar.close()
    if len(entries) < num_entries:
        raise DatasetError(_shortfall(entries, num_entries, attempt, rejected, output))
    return entries


def _reflected(magpie: Magpie, entry: dict, seed: int) -> dict:
    """The reflection of ``entry``, or ``entry`` marked with why it could not be improved."""
    try:
        return magpie.reflect(entry, seed)
    except Rejected as exc:
        return {**entry, "reflection_error": str(exc)}


class _Failures:
    """Counts failed requests in a row (a ``with`` block each); too many re-raise."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            self.in_a_row = 0
            return False
        if not issubclass(kind, JudgeUnavailableError):
            return False
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise JudgeUnavailableError(
                f"{self.in_a_row} failed requests in a row, so the model server counts as down; "
                f"last: {exc}"
            ) from None
        print(f"request failed (tried again): {exc}", file=sys.stderr)
        return True  # the same attempt is tried again


def _shortfall(entries: list, wanted: int, attempts: int, rejected: list, output: Path) -> str:
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[f"{r['stage']}: {r['reason']}"] = reasons.get(f"{r['stage']}: {r['reason']}", 0) + 1
    common = "; ".join(
        f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])[:3]
    )
    return (
        f"{output}: {len(entries)} of {wanted} entries after {attempts} attempts "
        f"({len(rejected)} rejected: {common or 'none'}; all listed in {rejected_path(output)}); "
        "the kept entries are saved: raise --max_attempts (or --max_tokens) and run again"
    )


def server_completion(model: str, url: str | None, api: str, timeout: float) -> Complete:
    """``complete_text`` bound to one model on one server."""

    def complete(prompt: str, **kwargs) -> tuple[str, str]:
        return complete_text(prompt, model, url, api=api, timeout=timeout, **kwargs)

    return complete


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_instruction_data.py",
        description="Write Alpaca-format instruction data with a local LLM, Magpie-style. "
        "Entries are saved as they arrive; a rerun continues.",
    )
    p.add_argument("--model", required=True, help="the model that writes the data")
    p.add_argument("--url", help="its server's host or endpoint (default: $OLLAMA_HOST)")
    p.add_argument("--api", choices=JUDGE_APIS, default="ollama", help="default: ollama")
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="llama3",
        help="the model's chat template (alpaca or phi3: a model fine-tuned here); default: llama3",
    )
    p.add_argument("--num_entries", type=int, required=True, help="entries wanted in --output")
    p.add_argument("--output", required=True, help="the JSON file of entries (feeds --data)")
    p.add_argument(
        "--reflect",
        action="store_true",
        help="improve each entry by critique and "
        "rewrite; the first version is kept under 'original'",
    )
    p.add_argument("--seed", type=int, default=123, help="attempt k uses seed + k")
    p.add_argument("--max_tokens", type=int, default=256, help="tokens per generated text")
    p.add_argument("--temperature", type=float, default=1.0, help="the instructions' (1.0)")
    p.add_argument("--threshold", type=float, default=0.9, help="near-duplicate cosine (0.9)")
    p.add_argument("--max_attempts", type=int, help="attempts in all (default: 4 per entry)")
    p.add_argument("--timeout", type=float, default=JUDGE_TIMEOUT, help="seconds per reply")
    p.add_argument("--max_failures", type=int, default=JUDGE_MAX_FAILURES)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: 0 when done, 2 with one ``error:`` line, 130 on Ctrl-C."""
    args = build_arg_parser().parse_args(argv)
    try:
        if args.num_entries < 1 or args.max_tokens < 1 or args.max_failures < 1:
            raise ConfigError("--num_entries, --max_tokens and --max_failures must be at least 1")
        if not 0 < args.threshold <= 1:
            raise ConfigError(f"--threshold {args.threshold}: give a cosine in (0, 1]")
        if Path(args.output).is_dir():
            raise ConfigError(f"--output {args.output} is a folder; give a file name")
        split_timeout(args.timeout)
        endpoint = judge_endpoint(args.url, args.api)
        try:
            check_judge(endpoint, args.model, api=args.api)
        except JudgeUnavailableError as exc:
            raise JudgeUnavailableError(with_judge_hint(exc, args.api, args.model)) from None
        complete = server_completion(args.model, endpoint, args.api, args.timeout)
        magpie = Magpie(complete, TEMPLATES[args.template], args.max_tokens, args.temperature)
        entries = generate_instruction_data(
            magpie,
            args.output,
            args.num_entries,
            reflect=args.reflect,
            seed=args.seed,
            threshold=args.threshold,
            max_attempts=args.max_attempts,
            max_failures=args.max_failures,
        )
    except (ChapterError, OSError, KeyboardInterrupt) as exc:
        saved = f"the entries so far are saved in {args.output}; run the same command again"
        return interrupts.stopped_or_failed(exc, f"{saved} to go on")
    print(
        f"{len(entries)} entries in {args.output} (python main/instruction_finetuning.py "
        f"--data {args.output})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_command(main))
