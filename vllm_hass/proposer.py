"""HassTreeProposer: EAGLE-2 dynamic trees drafted by a HASS head inside vLLM.

One step, for every running request at once (a handful of batched forwards,
no Python loop over requests in the forwards):
1. First pass (causal): the head reads what the target just accepted — per
   request the root and its accepted path (or a whole prefill chunk) — with the
   target's hidden states, writing the draft's KV at those positions.
2. Root logits -> top_k children; depth-1 expansion passes run the head on the
   top_k frontier nodes of every request with tree attention over the draft's
   context + the node's ancestors (their KV lives in scratch slots after the
   context: vLLM's lookahead reservation).
3. Rerank to total_tokens-1 nodes (tree.grow); return them in BFS order as the
   request's speculative tokens and remember (parents, depths) for verification.

Subclasses vLLM's EagleProposer so model loading, embedding/lm_head sharing,
the drafter KV cache and dummy runs are vLLM's own.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_hass.attention import TreeAttnInfo, attach
from vllm_hass.kernels.tree_attention import pack_tree_mask
from vllm_hass.tree import grow

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


class HassTreeProposer(EagleProposer):
    def __init__(self, vllm_config, device, runner, tree):
        super().__init__(vllm_config, device, runner)
        self.tree = tree

    # -- helpers ---------------------------------------------------------------
    def _slots(self, block_table: torch.Tensor, req: torch.Tensor, pos: torch.Tensor):
        bs = self.block_size
        return block_table[req, pos // bs].long() * bs + pos % bs

    def _forward(self, input_ids, positions, hidden, cad, tree_info=None):
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        attach(per_layer, tree_info)
        n = input_ids.shape[0]
        with set_forward_context(per_layer, self.vllm_config, num_tokens=n,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=self._get_slot_mapping(n, cad.slot_mapping)):
            # vLLM's CPU ops read raw pointers: hand them contiguous tensors
            out, _ = self.model(input_ids=input_ids.int().contiguous(),
                                positions=positions.contiguous(),
                                hidden_states=hidden.contiguous(), inputs_embeds=None)
        return out

    def _cad(self, qsl: torch.Tensor, seq_lens: torch.Tensor, block_table, slots) -> CommonAttentionMetadata:
        qsl_cpu = qsl.cpu().to(torch.int32)
        q_lens = qsl_cpu[1:] - qsl_cpu[:-1]
        seq_cpu = seq_lens.cpu().to(torch.int32)
        return CommonAttentionMetadata(
            query_start_loc=qsl.to(self.device, torch.int32),
            query_start_loc_cpu=qsl_cpu,
            seq_lens=seq_lens.to(self.device, torch.int32),
            seq_lens_cpu_upper_bound=seq_cpu,
            num_reqs=int(q_lens.numel()),
            num_actual_tokens=int(qsl_cpu[-1]),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_cpu.max()),
            block_table_tensor=block_table,
            slot_mapping=slots,
            causal=True,
        )

    # -- the step ----------------------------------------------------------------
    def propose_trees(self, *, input_ids, positions, hidden, qsl, block_table,
                      eligible) -> tuple[list[tuple[list[int], list[int], list[int]]], torch.Tensor]:
        """All tensors cover the B requests of the step, in the runner's order.

        input_ids/positions/hidden: the first pass's tokens (concatenated per request,
        `qsl` [B+1] offsets); block_table [B, max_blocks]; eligible [B] bool (draft a
        tree for this request). Returns one (tokens, parents, depths) per drafted
        request, and the indices of those requests.
        """
        dev = self.device
        B = qsl.numel() - 1
        lens = qsl[1:] - qsl[:-1]
        last_pos = positions[qsl[1:] - 1]
        req = torch.repeat_interleave(torch.arange(B, device=dev), lens)
        slots = self._slots(block_table, req, positions)
        cad = self._cad(qsl, last_pos + 1, block_table, slots)
        out = self._forward(input_ids, positions, hidden, cad)

        idx = torch.nonzero(eligible, as_tuple=False).flatten()
        if idx.numel() == 0:
            return [], idx
        K, depth = self.tree.top_k, self.tree.depth
        Be = idx.numel()
        root_out = out[qsl[1:][idx] - 1]  # [Be, H]
        root_logp = torch.log_softmax(self.model.compute_logits(root_out).float(), -1)
        base = last_pos[idx]  # the draft's position of the last accepted token
        bt = block_table[idx]
        ar = torch.arange(K, device=dev)
        qsl_e = torch.arange(0, Be * K + 1, K, device=dev)
        state = {"prev": root_out.unsqueeze(1).expand(Be, K, -1)}

        def expand(step, tokens, src, mask):
            hid = state["prev"].gather(1, src.clamp(min=0).unsqueeze(-1).expand(
                Be, K, state["prev"].shape[-1]))
            pos = (base + step).unsqueeze(1).expand(Be, K)
            scratch = base.unsqueeze(1) + 1 + (step - 1) * K + ar  # linear KV positions
            slots_e = self._slots(bt, torch.arange(Be, device=dev).unsqueeze(1), scratch)
            cad_e = self._cad(qsl_e, base + 1 + step * K, bt, slots_e.flatten())
            # one frontier node per request (a chain): it is the last token of its
            # sequence, so vLLM's causal kernel already shows it exactly its ancestors
            info = None if K == 1 else TreeAttnInfo(
                rows=torch.arange(Be * K, device=dev),
                query_start_loc=qsl_e.to(torch.int32),
                block_table=bt,
                prefix_lens=(base + 1).to(torch.int32),
                tree_lens=torch.full((Be,), step * K, dtype=torch.int32, device=dev),
                tree_mask=pack_tree_mask(mask.reshape(Be * K, -1)),
                all_rows=True,
            )
            o = self._forward(tokens.flatten(), pos.flatten(), hid.reshape(Be * K, -1), cad_e, info)
            state["prev"] = o.view(Be, K, -1)
            return torch.log_softmax(self.model.compute_logits(o).float(), -1).view(Be, K, -1)

        trees = grow(root_logp, expand, top_k=K, depth=depth,
                     total_tokens=self.tree.total_tokens)
        return trees.to_lists(), idx


def first_pass_inputs(runner, acc, trees, sampled_bonus):
    """Per request, what the head reads this step (numpy bookkeeping on the host).

    tree/decode request: root + accepted path, positions root..root+L (after
    compaction), tokens = the next token at each (path tokens, then the bonus).
    prefill chunk: every scheduled row; the last token is the sampled one, or the
    next prompt token for a chunk that does not finish the prompt.
    """
    ib = runner.input_batch
    B = ib.num_reqs
    qsl = runner.query_start_loc.cpu[: B + 1].numpy()
    computed = ib.num_computed_tokens_cpu[:B]
    n_sched = qsl[1:] - qsl[:-1]
    has_tree = acc.has_tree.cpu().numpy()
    length = acc.length.cpu().numpy()
    path = acc.path.cpu().numpy()
    ids = runner.input_ids.cpu
    rows, pos, toks, counts, partial = [], [], [], [], []
    bonus = sampled_bonus.cpu().numpy()
    discard = runner.discard_request_mask.np[:B]
    for b in range(B):
        start = int(qsl[b])
        if has_tree[b]:
            L = int(length[b])
            slots = np.concatenate([[0], path[b, :L]])
            r = start + slots
            p = computed[b] + np.arange(L + 1)
            nxt = np.concatenate([trees.tokens[b, path[b, :L]].cpu().numpy(), [bonus[b]]])
            partial.append(False)
        else:
            n = int(n_sched[b])
            r = start + np.arange(n)
            p = computed[b] + np.arange(n)
            if discard[b]:  # a prefill chunk that does not end the prompt
                req_state = runner.requests[ib.req_ids[b]]
                last = req_state.get_token_id(int(computed[b]) + n)
                partial.append(True)
            else:
                last = bonus[b]
                partial.append(False)
            nxt = np.concatenate([ids[start + 1: start + n].numpy(), [last]])
        rows.append(r)
        pos.append(p)
        toks.append(nxt)
        counts.append(len(r))
    qsl_fp = np.concatenate([[0], np.cumsum(counts)])
    return (np.concatenate(rows), np.concatenate(pos), np.concatenate(toks).astype(np.int64),
            qsl_fp, np.array(partial))
