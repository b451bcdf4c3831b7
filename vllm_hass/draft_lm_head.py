"""The draft's lm_head over a reduced draft vocabulary, cut from the target's.

A HASS/EAGLE-1 head shares the target's lm_head; a draft level then pays for the whole
vocabulary (Llama-3: 128,256 x 4,096 per drafted token). With a draft vocabulary
(`vllm_hass.vocab`: the specials plus the most frequent tokens) the draft scores only those
rows; the target still verifies every token, so outputs do not change.

Tensor parallel: the target's lm_head is vocab-parallel (rank r holds the rows of its
vocabulary range). Each rank keeps only the draft rows inside its own range, padded to the
largest rank's count P with zero rows whose logits are -inf, and the ranks' logits are
all-gathered like vLLM's LogitsProcessor does: the draft's logit columns are then in
"serving order" (rank 0's draft ids, rank 1's, ...), and `token_ids` maps a column to its
target id. Nothing is communicated at load time: every rank computes every rank's range.
Built once after vLLM shares the target's lm_head with the draft (proposer.load_model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_hass.errors import UserError


class DraftLMHead:
    def __init__(self, lm_head, draft_ids: torch.Tensor, scale: float = 1.0):
        """lm_head: the target's ParallelLMHead (this rank's shard); draft_ids [Vd] int64
        target ids, the draft vocabulary in its stored order."""
        method = type(getattr(lm_head, "quant_method", None)).__name__
        if method != "UnquantizedEmbeddingMethod":
            raise UserError(f"hass.json: 'draft_vocab_size' needs an unquantized target lm_head, "
                            f"got {method} (use 'draft_vocab_size': 0)")
        V = lm_head.org_vocab_size
        ids = draft_ids.long().cpu()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
            raise UserError(f"draft_vocab.safetensors: 'd2t' must map to {ids.numel()} distinct target "
                            f"ids in [0, {V})")
        tp, rank = lm_head.tp_size, lm_head.tp_rank
        ranges = [lm_head._get_indices(lm_head.num_embeddings_padded, lm_head.org_vocab_size_padded,
                                       lm_head.num_embeddings, lm_head.org_vocab_size, r, tp)
                  for r in range(tp)]
        per_rank = [ids[(ids >= s.org_vocab_start_index) & (ids < s.org_vocab_end_index)] for s in ranges]
        P = max(int(x.numel()) for x in per_rank)
        weight = lm_head.weight  # [V/tp (padded), H] this rank's rows
        dev = weight.device
        mine = per_rank[rank] - ranges[rank].org_vocab_start_index
        self.weight = torch.zeros(P, weight.shape[1], dtype=weight.dtype, device=dev)  # [P, H]
        self.weight[: mine.numel()] = weight[mine.to(dev)]
        serving = torch.zeros(tp * P, dtype=torch.long)
        valid = torch.zeros(tp * P, dtype=torch.bool)
        for r, rows in enumerate(per_rank):
            serving[r * P: r * P + rows.numel()] = rows
            valid[r * P: r * P + rows.numel()] = True
        self.token_ids = serving.to(dev)  # [tp*P] target id of each draft logit column
        self.pad_bias = (None if bool(valid.all()) else  # [tp*P] -inf on padding columns
                         torch.where(valid, 0.0, float("-inf")).to(dev))
        self.valid_cols = valid.nonzero().squeeze(1).to(dev)  # [Vd] columns holding a draft id
        self.valid_ids = serving[valid].to(dev)  # [Vd] their target ids
        self.vocab_size, self.size, self.tp, self.scale = V, ids.numel(), tp, scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> draft logits [n, tp*P] in serving order (float of the weight)."""
        out = F.linear(hidden.to(self.weight.dtype), self.weight)  # [n, P]
        if self.tp > 1:
            from vllm.distributed import tensor_model_parallel_all_gather

            out = tensor_model_parallel_all_gather(out.contiguous(), dim=-1)  # [n, tp*P]
        if self.pad_bias is not None:
            out = out + self.pad_bias
        if self.scale != 1.0:
            out = out * self.scale
        return out

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, V] target-vocabulary logits, -inf outside the draft vocabulary: what vLLM's
        own EAGLE loop (chains on CUDA) takes the argmax of."""
        draft = self.logits(hidden)
        out = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        out[:, self.valid_ids] = draft[:, self.valid_cols]
        return out
