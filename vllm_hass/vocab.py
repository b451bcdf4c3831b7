"""A reduced draft vocabulary for a HASS head: build, store, read, check.

Why: one draft level's cost is dominated by the full-vocabulary lm_head the head
shares with the target (SmolLM2: 49,152 x 576, ~28M of ~33M multiply-adds per
token). Drafting from the rows of the tokens the target actually emits cuts that,
and verification by the target keeps the output exact.

Storage (EAGLE-3 / speculators convention), inside the head directory:
    draft_vocab.safetensors   d2t int64 [Vd]  target id of draft id i = i + d2t[i]
                              t2d bool  [V]   True where a target id is in the vocabulary
    config.json               "draft_vocab_size": Vd, and hass.draft_vocab = {file, size,
                              special_tokens, source, tokens_counted, coverage, ...}
Draft ids are ordered: the special tokens first (ascending id), then by descending
frequency, ties by ascending target id. So every prefix of n >= specials ids is
"the specials plus the n - specials most frequent tokens", which is what hass.json's
`draft_vocab_size` selects. Each file is written to a temporary file in the head
directory and renamed into place (both written before either is renamed);
model.safetensors is never touched.

No vLLM import here; config.py imports converters.layout, which imports this module,
so this module imports neither of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from vllm_hass.errors import UserError

VOCAB_FILE = "draft_vocab.safetensors"
TENSORS = {"d2t": torch.int64, "t2d": torch.bool}
_ST_DTYPES = {"I64": torch.int64, "BOOL": torch.bool, "I32": torch.int32, "F32": torch.float32,
              "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I8": torch.int8}


# Building ---------------------------------------------------------------------------

def count_tokens(seqs: Iterable, vocab_size: int, where: str = "token ids") -> np.ndarray:
    """Histogram [V] int64 of the token ids in `seqs` (each a 1-D int sequence)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in seqs:
        a = np.asarray(s, dtype=np.int64).reshape(-1)  # [n]
        if a.size == 0:
            continue
        if a.min() < 0 or a.max() >= vocab_size:
            bad = int(a.max() if a.max() >= vocab_size else a.min())
            raise UserError(f"{where}: token id {bad} outside the target's vocabulary "
                            f"(vocab_size {vocab_size})")
        counts += np.bincount(a, minlength=vocab_size)
    return counts


def build_draft_ids(counts: np.ndarray, special_ids: Iterable[int], size: int) -> np.ndarray:
    """The `size` draft ids [size] int64 (target ids): specials first (ascending), then
    by descending count, ties (and never-seen tokens) by ascending target id."""
    counts = np.asarray(counts, dtype=np.int64)  # [V]
    V = counts.shape[0]
    specials = sorted({int(i) for i in special_ids if 0 <= int(i) < V})
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
            len(specials) <= size <= V) or size < 1:
        raise UserError(f"draft vocabulary size must be an integer between {max(1, len(specials))} "
                        f"(the {len(specials)} special tokens) and {V} (the vocabulary), got {size!r}")
    rest = np.ones(V, dtype=bool)
    rest[specials] = False
    ids = np.arange(V, dtype=np.int64)[rest]
    order = np.lexsort((ids, -counts[ids]))  # last key is primary: count desc, then id asc
    return np.concatenate([np.asarray(specials, dtype=np.int64), ids[order]])[:size]


def coverage(draft_ids, token_ids) -> float:
    """Fraction of `token_ids` (1-D) inside the vocabulary `draft_ids` (1.0 when empty)."""
    t = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if t.size == 0:
        return 1.0
    return float(np.isin(t, np.asarray(draft_ids, dtype=np.int64)).mean())


def count_coverage(draft_ids, counts: np.ndarray) -> float:
    """coverage() from a histogram [V] of the tokens instead of the tokens themselves."""
    total = int(counts.sum())
    return 1.0 if total == 0 else float(counts[np.asarray(draft_ids)].sum()) / total


def build(counts: np.ndarray, specials: list[int], size: int, source: str,
          held_out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(draft ids [size], the meta write_vocab records). counts/held_out: histograms [V]
    of the counted and of the held-out tokens (coverage is reported on both)."""
    ids = build_draft_ids(counts, specials, size)
    meta = {"special_tokens": len(specials), "source": source,
            "tokens_counted": int(counts.sum()), "coverage": round(count_coverage(ids, counts), 6)}
    if held_out is not None:
        meta["holdout_tokens"] = int(held_out.sum())
        meta["holdout_coverage"] = round(count_coverage(ids, held_out), 6)
    return ids, meta


def special_ids(target_dir: str | os.PathLike, vocab_size: int) -> list[int]:
    """bos/eos/pad/unk ids (config.json, generation_config.json; eos may be a list) and
    every added token of the tokenizer (tokenizer.json, tokenizer_config.json), read as
    plain JSON so no transformers import is needed. Ascending, inside [0, V)."""
    d = Path(target_dir)
    ids: set[int] = set()

    def load(name):
        try:
            return json.loads((d / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def add(v):
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not isinstance(x, bool):
                ids.add(x)

    for cfg in (load("config.json"), load("generation_config.json")):
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            add(cfg.get(key))
    tok, tok_cfg = load("tokenizer.json"), load("tokenizer_config.json")
    for t in tok.get("added_tokens") or []:
        add(t.get("id") if isinstance(t, dict) else None)
    add([int(k) for k in (tok_cfg.get("added_tokens_decoder") or {}) if str(k).isdigit()])
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = tok_cfg.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            add(vocab.get(name) if isinstance(name, str) else None)
    return sorted(i for i in ids if 0 <= i < vocab_size)


# Storing ----------------------------------------------------------------------------

def maps(draft_ids, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """draft ids -> (d2t int64 [Vd], t2d bool [V])."""
    ids = torch.as_tensor(np.asarray(draft_ids), dtype=torch.int64).reshape(-1)  # [Vd]
    d2t = ids - torch.arange(ids.numel(), dtype=torch.int64)  # [Vd]
    t2d = torch.zeros(vocab_size, dtype=torch.bool)  # [V]
    t2d[ids] = True
    return d2t, t2d


def _temp_beside(path: Path, write) -> str:
    """write(tmp) into a new temp file beside `path`, with the permissions a file the user
    creates would have (mkstemp makes it private); returns its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _read_config(head_dir: Path) -> dict:
    path = head_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{path}: missing (expected a head directory made by `vllm-hass convert`)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def write_vocab(head_dir: str | os.PathLike, draft_ids, vocab_size: int, meta: dict) -> Path:
    """Store the vocabulary (d2t/t2d) and its config.json entries in `head_dir`.
    meta: source, tokens_counted, coverage, special_tokens (and anything else to record)."""
    from safetensors.torch import save_file

    head_dir = Path(head_dir)
    cfg = _read_config(head_dir)
    if cfg.get("vocab_size") != vocab_size:
        raise UserError(f"{head_dir}/config.json: 'vocab_size' is {cfg.get('vocab_size')!r}, "
                        f"the vocabulary was built for {vocab_size}")
    ids = np.asarray(draft_ids, dtype=np.int64).reshape(-1)  # [Vd]
    n = ids.size
    if not 0 < n < vocab_size:
        raise UserError(f"draft vocabulary: size must be between 1 and {vocab_size - 1} "
                        f"(below vocab_size), got {n}")
    if ids.min() < 0 or ids.max() >= vocab_size or np.unique(ids).size != n:
        raise UserError(f"draft vocabulary: ids must be distinct target ids in [0, {vocab_size})")
    d2t, t2d = maps(ids, vocab_size)
    cfg["draft_vocab_size"] = n
    cfg.setdefault("hass", {})["draft_vocab"] = {"file": VOCAB_FILE, "size": n, **meta}
    # Both files are written in full first, then renamed into place one after the other:
    # a failure while writing leaves the head exactly as it was.
    tmps = []
    try:
        tmps.append(_temp_beside(head_dir / VOCAB_FILE, lambda p: save_file(
            {"d2t": d2t, "t2d": t2d}, p, metadata={"format": "pt"})))
        tmps.append(_temp_beside(head_dir / "config.json", lambda p: Path(p).write_text(
            json.dumps(cfg, indent=2) + "\n")))
        os.replace(tmps[0], head_dir / VOCAB_FILE)
        os.replace(tmps[1], head_dir / "config.json")
    finally:
        for t in tmps:
            Path(t).unlink(missing_ok=True)
    return head_dir / VOCAB_FILE


# Reading and checking ---------------------------------------------------------------

def stored_size(cfg: dict) -> int:
    """config.json's draft_vocab_size (0: none): absent, or equal to vocab_size, means the
    head has no reduced vocabulary."""
    v = cfg.get("draft_vocab_size")
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v and v != cfg.get("vocab_size"):
        return v
    return 0


def check_tensors(tensors: dict, draft_vocab_size: int, vocab_size: int, where: str) -> None:
    """d2t/t2d among a head's weights (tensors, or anything with .shape; a dtype missing
    there is read from the file). When WHERE is the head directory, its
    draft_vocab.safetensors must hold exactly d2t and t2d, checked from its header
    whether or not `tensors` holds them. One-line errors naming the file and the field;
    the other weights are check_weights' business."""
    head = Path(where)
    path = head / VOCAB_FILE if head.is_dir() else None
    file = str(path) if path is not None else VOCAB_FILE
    on_disk = _file_header(path) if path is not None and path.exists() else None
    present = [k for k in TENSORS if k in tensors or (on_disk and k in on_disk)]
    if not draft_vocab_size:
        if present or on_disk:
            raise UserError(f"{file}: present but config.json has no 'draft_vocab_size' "
                            "(rebuild it with `vllm-hass vocab`, or delete the file)")
        return
    if path is not None and on_disk is None:
        raise UserError(f"{head}/config.json: 'draft_vocab_size' is {draft_vocab_size} but "
                        f"{VOCAB_FILE} is missing (rebuild it with `vllm-hass vocab`)")
    extra = sorted(set(on_disk or ()) - set(TENSORS))
    if extra:
        raise UserError(f"{file}: unexpected tensor '{extra[0]}' (expected only d2t and t2d)")
    if (present or on_disk is not None) and len(present) < len(TENSORS):
        missing = next(k for k in TENSORS if k not in present)
        raise UserError(f"{file}: missing tensor '{missing}' (expected d2t and t2d)")
    want = {"d2t": (draft_vocab_size,), "t2d": (vocab_size,)}
    for name in present:
        disk = (on_disk or {}).get(name, (None, None))
        t = tensors.get(name)  # None: check_weights was given model.safetensors' weights only
        shape = tuple(t.shape) if t is not None else disk[1]
        dtype = getattr(t, "dtype", None) or disk[0]
        if shape != want[name] or (dtype is not None and dtype != TENSORS[name]):
            got = str(dtype).removeprefix("torch.") if dtype is not None else "?"
            raise UserError(f"{file}: '{name}' is {got} {list(shape)}, expected "
                            f"{str(TENSORS[name]).removeprefix('torch.')} {list(want[name])} "
                            f"(config.json draft_vocab_size {draft_vocab_size}, vocab_size {vocab_size})")


def _file_header(path: Path) -> dict:
    """Tensor name -> (dtype, shape) from a safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            out = {}
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (_ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
            return out
    except Exception as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_vocab(head_dir: str | os.PathLike):
    """(draft_ids LongTensor [Vd] in stored order, meta dict), or (None, None) when the
    head has no vocabulary. Checks the file strictly against config.json."""
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    cfg = _read_config(head_dir)
    n, V = stored_size(cfg), cfg.get("vocab_size")
    path = head_dir / VOCAB_FILE
    if not path.exists() and not n:
        return None, None
    check_tensors({}, n, V, str(head_dir))  # names, dtypes and shapes, from the header
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    d2t, t2d = tensors["d2t"], tensors["t2d"]  # [Vd], [V]
    ids = torch.arange(n, dtype=torch.int64) + d2t  # [Vd]
    if ids.min() < 0 or ids.max() >= V or torch.unique(ids).numel() != n:
        raise UserError(f"{path}: 'd2t' must map draft ids to distinct target ids in [0, {V})")
    if int(t2d.sum()) != n or not bool(t2d[ids].all()):
        raise UserError(f"{path}: 't2d' does not mark exactly the {n} target ids of 'd2t'")
    meta = (cfg.get("hass") or {}).get("draft_vocab") or {}
    if meta.get("size", n) != n:
        raise UserError(f"{head_dir}/config.json: 'hass.draft_vocab.size' is {meta.get('size')}, "
                        f"'draft_vocab_size' is {n}")
    return ids, dict(meta)
