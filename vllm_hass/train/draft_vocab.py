"""`train fit --draft-vocab V`: which draft vocabulary a training run uses.

A head served with a reduced vocabulary only ever proposes those tokens, so it is
trained the same way: its logits come from the V rows of the lm_head (sliced once
per run, fit.py) and its losses are over the vocabulary (losses.py says how the
target's probability mass outside it is handled). The vocabulary is either taken
from a head that has one (`--draft-vocab-from HEAD`, e.g. made by `vllm-hass
vocab`; a size below its stored size takes a prefix) or built from the training
data's own assistant tokens (training samples only; coverage is also measured on
the held-out ones), and is saved with the trained head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from vllm_hass.errors import UserError


@dataclasses.dataclass
class DraftVocab:
    ids: torch.Tensor    # [Vd] int64: target id of each draft id (stored order)
    index: torch.Tensor  # [V] int64: draft id of each target id, -1 outside the vocabulary
    meta: dict           # what write_vocab records (source, counts, coverage)

    @classmethod
    def from_ids(cls, ids, vocab_size: int, meta: dict) -> "DraftVocab":
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        index = torch.full((vocab_size,), -1, dtype=torch.int64)
        index[ids] = torch.arange(ids.numel())
        return cls(ids, index, meta)

    def to(self, device) -> "DraftVocab":
        return DraftVocab(self.ids.to(device), self.index.to(device), self.meta)


def resolve(size: int, from_dir: str | None, samples, train_idx: list[int],
            eval_idx: list[int], target: Path, vocab_size: int) -> DraftVocab | None:
    """The run's vocabulary, or None for the full one (size 0 and no from_dir). Its
    recorded coverage is always measured on this run's training (and held-out) samples."""
    from vllm_hass.vocab import build_draft_ids, count_coverage, count_tokens, special_ids

    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < vocab_size:
        raise UserError(f"--draft-vocab {size}: expected 0 (the full vocabulary) or a size below "
                        f"the target's vocab_size {vocab_size}")
    if from_dir is None and size == 0:
        return None
    where = f"--data {samples.dir}"
    counts = count_tokens((samples.tokens(i).numpy() for i in train_idx), vocab_size, where)
    held = count_tokens((samples.tokens(i).numpy() for i in eval_idx), vocab_size, where)
    data = f"train data {Path(samples.dir).absolute()}"
    if from_dir is not None:
        ids, n_special, source = _stored(size, Path(from_dir), vocab_size)
        source += f"; coverage on {data}"
    else:
        specials = special_ids(target, vocab_size)
        n_special = len(specials)
        if size < n_special:
            raise UserError(f"--draft-vocab {size}: below the {n_special} special tokens of "
                            f"{target}, which are always kept")
        ids = build_draft_ids(counts, specials, size)
        source = f"{data} (assistant tokens of {len(train_idx)} training samples)"
    meta = {"special_tokens": n_special, "source": source, "tokens_counted": int(counts.sum()),
            "coverage": round(count_coverage(ids, counts), 6)}
    if eval_idx:
        meta.update(holdout_tokens=int(held.sum()),
                    holdout_coverage=round(count_coverage(ids, held), 6))
    return DraftVocab.from_ids(ids, vocab_size, meta)


def _stored(size: int, head: Path, vocab_size: int):
    """(ids [n], specials, source) of the vocabulary stored in `head`, cut to `size` (0: all)."""
    from vllm_hass.vocab import read_vocab

    if not head.is_dir():
        raise UserError(f"--draft-vocab-from {head}: no such head directory")
    if not (head / "config.json").exists():
        raise UserError(f"--draft-vocab-from {head}: no config.json (expected a head directory "
                        "made by `vllm-hass convert` or `train fit`)")
    ids, meta = read_vocab(head)
    if ids is None:
        raise UserError(f"--draft-vocab-from {head}: the head has no draft vocabulary "
                        "(build one with `vllm-hass vocab`)")
    if _head_vocab(head) != vocab_size:
        raise UserError(f"--draft-vocab-from {head}: made for vocab_size {_head_vocab(head)}, "
                        f"the target's is {vocab_size}")
    n, specials = size or ids.numel(), int(meta.get("special_tokens", 0))
    if n > ids.numel():
        raise UserError(f"--draft-vocab {size}: must be <= the {ids.numel()} tokens stored in "
                        f"{head} (or 0 for all of them)")
    if n < specials:
        raise UserError(f"--draft-vocab {size}: below the {specials} special tokens of "
                        f"{head}'s vocabulary")
    source = f"the first {n} of the {ids.numel()} in {head.absolute()}"
    if meta.get("source"):
        source += f" (built from {meta['source']})"
    return ids[:n].numpy(), specials, source


def _head_vocab(head: Path):
    import json

    return json.loads((head / "config.json").read_text()).get("vocab_size")
