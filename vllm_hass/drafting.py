"""Drafting EAGLE-2 trees with a HASS head, for every request of a step at once.

1. First pass (causal): the head reads what the target just accepted — per request the
   root and its accepted path (padded to the longest possible path, so the layout is
   fixed before acceptance is known), or a whole prefill chunk — with the target's
   hidden states, writing the draft's KV at those positions.
2. Root logits -> top_k children; depth-1 expansion passes run the head on the top_k
   frontier nodes of every request with tree attention over the draft's context + the
   node's ancestors (their KV lives in scratch slots after the context: vLLM's
   lookahead reservation).
3. Rerank to total_tokens-1 nodes (tree.grow), returned in BFS order.

`TreeDrafter` is the loop; a subclass supplies the head's forward and logits
(proposer.HassTreeProposer: vLLM's EAGLE machinery; the host-overhead harness: stand-ins).
No vLLM import. No device->host sync: lengths the attention metadata needs on the host
are upper bounds known before the step (`DraftAttn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_hass.attn_info import TreeAttnInfo
from vllm_hass.kernels.tree_attention import pack_tree_mask
from vllm_hass.step import FirstPass, TreeStep, first_pass_inputs
from vllm_hass.tree import Trees, grow

_MASKED_PARAMS = (
    ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
    ("min_p", 0.0), ("logit_bias", None), ("allowed_token_ids", None), ("bad_words", None),
    ("structured_outputs", None), ("logits_processors", None),
    ("thinking_token_budget", None),  # vLLM applies it to draft rows from the token history
)


def tree_eligible(params) -> bool:
    """Sampling options that depend only on a row's logits (temperature, top-k, top-p)
    are applied per tree node exactly; anything that depends on the tokens before a
    position (penalties, bad words, min_tokens, grammars) would differ from branch to
    branch, so such requests decode without drafts (still correct, just not faster)."""
    if params is None:
        return False
    for name, neutral in _MASKED_PARAMS:
        value = getattr(params, name, neutral)
        if value not in (neutral, [], {}, None) and value != neutral:
            return False
    return not getattr(params, "min_tokens", 0)


@dataclass
class DraftAttn:
    """What one draft forward attends: device tensors plus host numbers (exact or upper
    bounds, never read back from the device)."""

    query_start_loc: torch.Tensor  # [n+1] int32
    query_start_loc_cpu: np.ndarray  # [n+1]
    seq_lens: torch.Tensor  # [n] int32, exact
    seq_lens_bound: np.ndarray  # [n] host upper bounds
    num_tokens: int
    max_query_len: int
    block_table: torch.Tensor  # [n, max_blocks]
    slots: torch.Tensor  # [num_tokens] KV slot of each query row
    tree: TreeAttnInfo | None = None


class TreeDrafter:
    """Mixin: EAGLE-2 tree drafting. Needs self.tree (TreeConfig: the fixed tree, or the
    bound of "auto"'s shapes), self.block_size, self.device, self._forward(input_ids,
    positions, hidden, DraftAttn) -> [n, H] and self._logits(hidden [n, H]) -> [n, Vd]
    over the draft vocabulary, whose column j is target token self._draft_token_ids()[j]
    (None: Vd = V, the identity)."""

    def _draft_token_ids(self) -> torch.Tensor | None:
        return None

    def _constants(self, Be: int, K: int, depth: int) -> "_ExpandConstants":
        """Per-(batch size, shape) constants of the expansion passes (built once each)."""
        cache = self.__dict__.setdefault("_hass_expand_constants", {})
        key = (Be, K, depth)
        if key not in cache:
            if len(cache) > 512:  # "auto" varies the shape: keep the cache bounded
                cache.clear()
            cache[key] = _ExpandConstants(Be, K, depth, self.device)
        return cache[key]

    def _slots(self, block_table: torch.Tensor, req: torch.Tensor, pos: torch.Tensor):
        bs = self.block_size
        return block_table[req, pos // bs].long() * bs + pos % bs

    def propose_trees(self, fp: FirstPass, step: TreeStep | None, acc, hidden_states: torch.Tensor,
                      block_table: torch.Tensor, groups=None, clock=None):
        """The first pass, then the new trees. groups None: self.tree for every request of
        fp.eligible; returns packed [3, Be, M] (tokens, parents, depths, in fp.eligible's
        order). groups [(shape, pos, pos_dev)] ("auto"): shape (depth, top_k, total_tokens)
        for the requests fp.eligible[pos] (pos [n] host positions, pos_dev the same on the
        device, staged by the caller; None: every request, in order); returns [4, sum n, M]
        (ranks too; each group's trees padded with -1 to the largest), groups in order;
        [] = the first pass only (the head's KV stays complete). None when no tree is grown.
        clock.mark(label, data) (if given) times the parts (vllm_hass/auto_runtime.py)."""
        tok, hidden_rows, last, base = first_pass_inputs(fp, step, acc)
        first = DraftAttn(
            query_start_loc=fp.qsl_dev.int(), query_start_loc_cpu=fp.qsl,
            seq_lens=fp.seq_lens_dev.int(), seq_lens_bound=fp.seq_lens,
            num_tokens=int(fp.qsl[-1]), max_query_len=int((fp.qsl[1:] - fp.qsl[:-1]).max()),
            block_table=block_table, slots=self._slots(block_table, fp.row_req, fp.positions))
        out = self._forward(tok, fp.positions, hidden_states[hidden_rows], first)
        if clock is not None:
            clock.mark("first_end")
        if fp.eligible.size == 0:
            return None
        if groups is None:
            return self._grow(out, last, base, block_table, fp.eligible_dev, fp.base_bound,
                              self.tree, None).packed()
        parts = []
        for shape, pos, pos_dev in groups:
            idx = fp.eligible_dev if pos_dev is None else fp.eligible_dev[pos_dev]
            t = self._grow(out, last, base, block_table, idx, fp.base_bound[pos], shape, clock)
            parts.append(torch.stack([t.tokens, t.parents, t.depths, t.ranks]))  # [4, n, M]
        if not parts:
            return None
        M = max(p.shape[2] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, M - p.shape[2]), value=-1) for p in parts], 1)

    def _grow(self, out, last, base, block_table, idx, base_bound, shape, clock) -> Trees:
        """Trees of `shape` for the requests idx [Be] (device) of the first pass `out`;
        base_bound [Be]: host upper bounds of their last accepted positions."""
        Be = base_bound.size
        K, depth = shape.top_k, shape.depth
        if clock is not None:
            clock.mark("grow", (shape, Be))
        to_target = self._draft_token_ids()  # [Vd] or None: trees grow in draft ids
        root_out = out[last[idx]]  # [Be, H]
        root_logp = torch.log_softmax(self._logits(root_out).float(), -1)
        base = base[idx].unsqueeze(1)  # [Be, 1] the draft's position of the last accepted token
        bt = block_table[idx]
        c = self._constants(Be, K, depth)
        prefix = (base.squeeze(1) + 1).int()  # [Be]: every expansion node sees the context
        bound_pre = int(base_bound.max()) + 1
        prev = [root_out.unsqueeze(1).expand(Be, K, -1)]
        # KV slots of every expansion level at once: frontier s writes scratch positions
        # base + 1 + (s-1)*K + j (linear, after the context)
        slots = self._slots(bt, c.req, base + c.scratch_all).view(Be, max(depth - 1, 1), K)
        pos = (base + c.levels).unsqueeze(-1).expand(Be, -1, K)  # [Be, depth, K]

        def expand(s, tokens, src, mask):
            if clock is not None:
                clock.mark("level", Be * K)
            hid = prev[0].gather(1, src.clamp(min=0).unsqueeze(-1).expand(-1, -1, prev[0].shape[-1]))
            # one frontier node per request (a chain): it is the last token of its
            # sequence, so vLLM's causal kernel already shows it exactly its ancestors
            tree = None if K == 1 else TreeAttnInfo(
                query_start_loc=c.qsl, q_row_start=c.qsl[:-1], block_table=bt,
                prefix_lens=prefix, tree_lens=c.tree_lens[s], tree_mask=pack_tree_mask(mask.reshape(Be * K, -1)),
                all_rows=True, max_query_len=K, max_prefix_len=bound_pre)
            attn = DraftAttn(
                query_start_loc=c.qsl, query_start_loc_cpu=c.qsl_np, seq_lens=prefix + s * K,
                seq_lens_bound=base_bound + 1 + s * K, num_tokens=Be * K, max_query_len=K,
                block_table=bt, slots=slots[:, s - 1].flatten(), tree=tree)
            ids = tokens.flatten() if to_target is None else to_target[tokens.flatten()]
            o = self._forward(ids, pos[:, s].flatten(), hid.reshape(Be * K, -1), attn)
            prev[0] = o.view(Be, K, -1)
            return torch.log_softmax(self._logits(o).float(), -1).view(Be, K, -1)

        trees = grow(root_logp, expand, top_k=K, depth=depth, total_tokens=shape.total_tokens)
        if to_target is not None:
            trees.tokens = to_target[trees.tokens]
        if clock is not None:
            clock.mark("grown")
        return trees


class _ExpandConstants:
    """Device constants of the expansion passes for Be requests: query offsets, scratch
    offsets, levels and tree lengths."""

    def __init__(self, Be: int, K: int, depth: int, device):
        self.qsl_np = np.arange(0, Be * K + 1, K)
        self.qsl = torch.from_numpy(self.qsl_np).to(device, torch.int32)
        self.req = torch.arange(Be, device=device).unsqueeze(1)
        self.scratch_all = torch.arange(1, 1 + K * max(depth - 1, 1), device=device)  # [(depth-1)*K]
        self.levels = torch.arange(depth, device=device)
        self.tree_lens = {s: torch.full((Be,), s * K, dtype=torch.int32, device=device)
                          for s in range(1, depth)}
