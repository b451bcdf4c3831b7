"""A pure-torch EAGLE-2 decoder: the reference the plugin's acceptance is measured against.

One prompt at a time, greedy (T=0), outside vLLM: a transformers `LlamaForCausalLM`
target and the plain-torch `HassHead`. One decoding step, as in EAGLE-2
(Li et al. 2024; SafeAILab/EAGLE `topK_genrate`, `evaluate_posterior`,
`update_inference_inputs`):

  draft   The root is the last token the target emitted (not yet in its KV cache).
          Level 1 is the head's top_k after the root; every later level expands each
          frontier node into its top_k children, scores them by cumulative log-prob
          and keeps the global top_k as the next frontier.
  rerank  Keep the total_tokens - 1 best-scored nodes plus the root. Scores never
          rise along a path, so the kept nodes form a connected subtree.
  verify  One target forward over the tree: node i sits at position n + depth(i)
          and attends to the prefix and to its own ancestors only.
  accept  From the root, follow the child whose token is the target's argmax at
          its parent; where no child matches, that argmax is the bonus token.
  update  The target keeps the KV of the root and the accepted path; their
          features extend the head's own KV.

Chain drafting (vLLM's `num_speculative_tokens=k`) is the same tree with
top_k=1, depth=k, total_tokens=k+1.

`depth` counts drafted levels, so a perfect head accepts `depth` tokens per step
and tau = depth + 1. EAGLE-2's code expands `depth` times after the root's top-k,
so its depth=5 drafts 6 levels (our depth=6).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from vllm_hass.errors import UserError
from vllm_hass.head import HassHead


@dataclasses.dataclass(frozen=True)
class TreeShape:
    depth: int
    top_k: int
    total_tokens: int  # drafted nodes + the root, as in EAGLE-2's `total_token`

    def __post_init__(self) -> None:
        for name in ("depth", "top_k", "total_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"tree.{name}: expected a positive integer, got {v!r}")
        pool = self.top_k + (self.depth - 1) * self.top_k**2
        if not 2 <= self.total_tokens <= pool + 1:
            raise UserError(
                f"tree.total_tokens: expected 2..{pool + 1} for depth {self.depth} and "
                f"top_k {self.top_k} (root + drafted candidates), got {self.total_tokens}"
            )

    @classmethod
    def chain(cls, k: int) -> "TreeShape":
        return cls(depth=k, top_k=1, total_tokens=k + 1)

    @classmethod
    def from_dict(cls, d: dict) -> "TreeShape":
        unknown = set(d) - {"depth", "top_k", "total_tokens"}
        if unknown:
            raise UserError(f"tree: unknown field '{sorted(unknown)[0]}' (expected depth, top_k, total_tokens)")
        missing = {"depth", "top_k", "total_tokens"} - set(d)
        if missing:
            raise UserError(f"tree: missing field '{sorted(missing)[0]}'")
        return cls(**d)


@dataclasses.dataclass
class Result:
    tau: float  # mean (accepted drafted tokens + 1) per verify step
    per_depth: list[float]  # [d-1]: share of verify steps that accepted >= d drafted tokens
    tokens: list[list[int]]  # generated tokens per prompt (the prefill's token first)
    steps: int
    accepted: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tree_mask(parents: list[int]) -> torch.Tensor:
    """bool [N, N]: row i is True at i and at each ancestor of i.

    parents[i] < i, or -1 for a node whose parent lies outside (the root, or a
    draft node hanging off the head's cached prefix). Siblings never see each other.
    """
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise ValueError(f"parents[{i}] = {p}: a parent must precede its child")
            mask[i] |= mask[p]
    return mask


@dataclasses.dataclass
class DraftTree:
    """Nodes in pool order (parents first); node 0 is the root."""

    tokens: list[int]
    parents: list[int]  # index into this tree; -1 for the root
    depths: list[int]
    scores: list[float]


class Drafter:
    """The head, its KV cache over verified positions, and EAGLE-2's tree expansion."""

    def __init__(self, head: HassHead, embed: torch.Tensor, lm_head: torch.Tensor,
                 draft_ids: torch.Tensor | None = None):
        # With a draft vocabulary (draft_ids [Vd]: target id of each draft token) the head
        # scores lm_head[draft_ids] only, as the plugin's drafter does.
        self.head, self.embed, self.draft_ids = head, embed, draft_ids
        self.lm_head = lm_head if draft_ids is None else lm_head[draft_ids.to(lm_head.device)]
        self.k = self.v = None  # [1, nkv, S, D]: one entry per (feature_j, token_j+1) pair

    def _target_ids(self, idx: torch.Tensor) -> list:
        """Draft-vocabulary indices -> target token ids."""
        return (idx if self.draft_ids is None else self.draft_ids.to(idx.device)[idx]).tolist()

    def _run(self, tokens, hidden, positions, mask=None, past=None):
        dev = self.embed.device
        tokens = torch.as_tensor(tokens, device=dev)
        out, (k, v) = self.head(
            self.embed[tokens][None], hidden[None], torch.as_tensor(positions, device=dev)[None],
            mask=mask, past_kv=past,
        )
        return out[0], k, v

    def extend(self, seq: list[int], feats: torch.Tensor) -> torch.Tensor:
        """Append pairs (feats[j], seq[j+1]) not yet cached; return the last pair's output.

        feats covers seq[:-1]: the root (seq[-1]) has no target feature yet.
        """
        start = 0 if self.k is None else self.k.shape[2]
        past = None if self.k is None else (self.k, self.v)
        out, k, v = self._run(seq[start + 1:], feats[start:], range(start, len(seq) - 1), past=past)
        self.k = k if self.k is None else torch.cat((self.k, k), 2)
        self.v = v if self.v is None else torch.cat((self.v, v), 2)
        return out[-1]

    def logprobs(self, out: torch.Tensor) -> torch.Tensor:
        return self.head.logits(out, self.lm_head).float().log_softmax(-1)

    @torch.no_grad()
    def draft(self, seq: list[int], feats: torch.Tensor, shape: TreeShape) -> DraftTree:
        root_out = self.extend(seq, feats)
        K, cached = shape.top_k, self.k.shape[2]
        # Candidate pool: every child ever scored. `frontier` holds pool ids of the
        # nodes expanded next; fwd_* describe nodes already run through the head.
        lp = self.logprobs(root_out).topk(K)
        tok, score = self._target_ids(lp.indices), lp.values.tolist()
        parent, depth = [-1] * K, [1] * K
        frontier = list(range(K))
        hidden_in = root_out.expand(K, -1)
        fwd_parent: list[int] = []  # parent's index among forwarded nodes, -1 = root
        fwd_of: dict[int, int] = {}  # pool id -> forwarded index
        tk = tv = None
        for level in range(1, shape.depth):
            base = len(fwd_parent)
            fwd_parent += [fwd_of.get(parent[i], -1) for i in frontier]
            fwd_of.update({node: base + j for j, node in enumerate(frontier)})
            # A frontier node sees the cached prefix (root pair included), its
            # forwarded ancestors and itself: never a sibling or a cousin.
            m = tree_mask(fwd_parent)[base:]
            mask = torch.cat((torch.ones(len(frontier), cached, dtype=torch.bool), m), 1)
            past = (self.k, self.v) if tk is None else (torch.cat((self.k, tk), 2), torch.cat((self.v, tv), 2))
            out, k, v = self._run([tok[i] for i in frontier], hidden_in,
                                  [len(seq) - 2 + level] * len(frontier),
                                  mask=mask[None, None].to(self.embed.device), past=past)
            tk = k if tk is None else torch.cat((tk, k), 2)
            tv = v if tv is None else torch.cat((tv, v), 2)
            child = self.logprobs(out).topk(K)  # [F, K]
            cum = child.values + torch.tensor([score[i] for i in frontier], device=out.device)[:, None]
            first_child = len(tok)
            for f, node in enumerate(frontier):
                tok += self._target_ids(child.indices[f])
                score += cum[f].tolist()
                parent += [node] * K
                depth += [level + 1] * K
            best = cum.flatten().topk(min(K, cum.numel())).indices
            frontier = [first_child + int(b) for b in best]
            hidden_in = out[best // K]
        # Rerank. A stable sort keeps a parent ahead of an equal-scored child, so the
        # kept set stays connected even under ties.
        order = sorted(range(len(tok)), key=lambda i: -score[i])[: shape.total_tokens - 1]
        keep = sorted(order)  # pool order is topological
        index = {node: j + 1 for j, node in enumerate(keep)}
        return DraftTree(
            tokens=[seq[-1]] + [tok[i] for i in keep],
            parents=[-1] + [0 if parent[i] < 0 else index[parent[i]] for i in keep],
            depths=[0] + [depth[i] for i in keep],
            scores=[0.0] + [score[i] for i in keep],
        )


class Target:
    """A transformers Llama with a KV cache that can keep an arbitrary subset of entries."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def forward(self, tokens: list[int], positions: list[int], mask: torch.Tensor | None = None):
        """Returns (features [T, H] after the final norm, logits [T, V]).

        mask: bool [T, T] among the new tokens (True = attend); every new token
        also sees the whole cache. None = causal.
        """
        dev = self.model.lm_head.weight.device
        attn = None
        if mask is not None:
            full = torch.cat((torch.ones(len(tokens), self.cached, dtype=torch.bool), mask), 1)
            dtype = self.model.lm_head.weight.dtype
            attn = torch.zeros(full.shape, dtype=dtype).masked_fill(~full, torch.finfo(dtype).min)
            attn = attn[None, None].to(dev)
        h = self.model.model(
            input_ids=torch.as_tensor(tokens, device=dev)[None],
            position_ids=torch.as_tensor(positions, device=dev)[None],
            attention_mask=attn, past_key_values=self.cache, use_cache=True,
        ).last_hidden_state[0]
        return h, self.model.lm_head(h)

    def keep(self, n_prefix: int, rows: list[int]) -> None:
        """Keep the first n_prefix entries and, after them, new entries `rows` (in order)."""
        idx = torch.tensor(list(range(n_prefix)) + [n_prefix + r for r in rows])
        if hasattr(self.cache, "layers"):  # transformers >= 4.56
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(2, idx.to(layer.keys.device))
                layer.values = layer.values.index_select(2, idx.to(layer.values.device))
        else:
            for i in range(len(self.cache.key_cache)):
                self.cache.key_cache[i] = self.cache.key_cache[i].index_select(2, idx.to(self.cache.key_cache[i].device))
                self.cache.value_cache[i] = self.cache.value_cache[i].index_select(2, idx.to(self.cache.value_cache[i].device))


def accept(tree: DraftTree, target_argmax: list[int]) -> list[int]:
    """Tree indices of the accepted path, root first (greedy, T=0)."""
    children: dict[int, dict[int, int]] = {}
    for i in range(1, len(tree.tokens)):
        children.setdefault(tree.parents[i], {})[tree.tokens[i]] = i
    path = [0]
    while (nxt := children.get(path[-1], {}).get(target_argmax[path[-1]])) is not None:
        path.append(nxt)
    return path


class Oracle:
    def __init__(self, model, head: HassHead, embed: torch.Tensor, lm_head: torch.Tensor,
                 draft_ids: torch.Tensor | None = None):
        self.model, self.head, self.embed, self.lm_head = model, head, embed, lm_head
        self.draft_ids = draft_ids  # [Vd] the draft vocabulary, or None (full)

    @classmethod
    def load(cls, target_dir, head_dir, *, dtype=torch.float32, device="cpu",
             draft_vocab_size: int = 0) -> "Oracle":
        """draft_vocab_size: a prefix of the head's stored draft vocabulary; 0 = full."""
        from transformers import AutoModelForCausalLM

        from vllm_hass.converters.layout import load_checkpoint

        model = AutoModelForCausalLM.from_pretrained(
            str(target_dir), dtype=dtype, attn_implementation="eager"
        ).to(device).eval()
        ckpt = load_checkpoint(head_dir)
        head = HassHead(ckpt.head_config)
        head.load_head_state_dict(ckpt.weights)
        head = head.to(device=device, dtype=dtype).eval()
        # A head that ships its own embedding / lm_head uses it; otherwise it shares the target's.
        embed = ckpt.weights.get("embed_tokens.weight", model.get_input_embeddings().weight)
        lm_head = ckpt.weights.get("lm_head.weight", model.lm_head.weight)
        draft_ids = None
        if draft_vocab_size:
            from vllm_hass.vocab import read_vocab

            draft_ids, _ = read_vocab(head_dir)
            draft_ids = draft_ids[:draft_vocab_size]
        return cls(model, head, embed.to(device, dtype), lm_head.to(device, dtype), draft_ids)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, shape: TreeShape):
        """Greedy speculative decoding. Returns (new tokens, accepted drafted tokens per step)."""
        session = Session(self, prompt)
        accepted = []
        while len(session.seq) - len(prompt) < max_new_tokens:
            accepted.append(session.step(shape))
        return session.seq[len(prompt):][:max_new_tokens], accepted


class Session:
    """One sequence being decoded: seq ends with the root; feats are the target's
    features of seq[:-1]; the target caches seq[:-1] too."""

    @torch.no_grad()
    def __init__(self, oracle: Oracle, prompt: list[int]):
        self.target = Target(oracle.model)
        self.drafter = Drafter(oracle.head, oracle.embed, oracle.lm_head, oracle.draft_ids)
        self.feats, logits = self.target.forward(prompt, list(range(len(prompt))))
        self.seq = list(prompt) + [int(logits[-1].argmax())]

    @torch.no_grad()
    def step(self, shape: TreeShape) -> int:
        """Draft, verify, accept, update. Returns the number of drafted tokens accepted."""
        tree = self.drafter.draft(self.seq, self.feats, shape)
        n = len(self.seq) - 1  # the root's position
        h, logits = self.target.forward(tree.tokens, [n + d for d in tree.depths], tree_mask(tree.parents))
        path = accept(tree, logits.argmax(-1).tolist())
        self.target.keep(n, path)
        self.feats = torch.cat((self.feats, h[path]))
        self.seq += [tree.tokens[i] for i in path[1:]] + [int(logits[path[-1]].argmax())]
        return len(path) - 1


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain target-only greedy decoding with a KV cache (the losslessness reference)."""
    target = Target(model)
    seq = list(prompt)
    _, logits = target.forward(seq, list(range(len(seq))))
    while True:
        seq.append(int(logits[-1].argmax()))
        if len(seq) - len(prompt) >= max_new_tokens:
            return seq[len(prompt):]
        _, logits = target.forward(seq[-1:], [len(seq) - 1])


def summarize(tokens: list[list[int]], accepted: list[int], depth: int) -> Result:
    steps = len(accepted)
    return Result(
        tau=(sum(accepted) / steps + 1.0) if steps else float("nan"),
        per_depth=[sum(a >= d for a in accepted) / steps if steps else float("nan")
                   for d in range(1, depth + 1)],
        tokens=tokens, steps=steps, accepted=sum(accepted),
    )


def resolve_shape(tree: dict | TreeShape | None, k: int | None) -> TreeShape:
    if (tree is None) == (k is None):
        raise UserError("oracle: pass exactly one of tree={depth, top_k, total_tokens} or k")
    if k is not None:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"k: expected a positive integer, got {k!r}")
        return TreeShape.chain(k)
    return tree if isinstance(tree, TreeShape) else TreeShape.from_dict(dict(tree))


def oracle_tau(
    target_dir: str | os.PathLike,
    head_dir: str | os.PathLike,
    prompts_token_ids: list[list[int]],
    max_new_tokens: int,
    tree: dict | TreeShape | None = None,
    k: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress=None,
    draft_vocab_size: int = 0,
) -> Result:
    """tau, acceptance per depth and tokens for greedy EAGLE-2 decoding of every prompt."""
    shape = resolve_shape(tree, k)
    oracle = Oracle.load(Path(target_dir), Path(head_dir), dtype=dtype, device=device,
                         draft_vocab_size=draft_vocab_size)
    tokens, accepted = [], []
    for prompt in prompts_token_ids:
        out, acc = oracle.generate(list(prompt), max_new_tokens, shape)
        tokens.append(out)
        accepted += acc
        if progress is not None:
            progress()
    return summarize(tokens, accepted, shape.depth)
