"""The draft vocabulary's lm_head (vllm_hass/draft_lm_head.py), without an engine: rows cut
from a vocab-parallel lm_head at TP = 1 and 2 give exactly the target lm_head's logits of the
draft tokens, padding columns are -inf, and the full-vocabulary view is -inf elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding, pad_vocab_size

from vllm_hass.draft_lm_head import DraftLMHead
from vllm_hass.errors import UserError


class UnquantizedEmbeddingMethod:  # the name DraftLMHead checks, as vLLM's class is called
    pass


def shard(W: torch.Tensor, rank: int, tp: int):
    """A stand-in of rank `rank`'s ParallelLMHead over the full weight W [V, H]."""
    V = W.shape[0]
    padded = pad_vocab_size(V)
    idx = VocabParallelEmbedding._get_indices(padded, padded, V, V, rank, tp)
    per = padded // tp
    local = torch.zeros(per, W.shape[1])
    rows = W[idx.org_vocab_start_index: idx.org_vocab_end_index]
    local[: rows.shape[0]] = rows

    class Head:
        pass

    h = Head()
    h.weight, h.tp_size, h.tp_rank, h.org_vocab_size = local, tp, rank, V
    h.num_embeddings_padded = h.org_vocab_size_padded = padded
    h.num_embeddings = V
    h._get_indices = VocabParallelEmbedding._get_indices
    h.quant_method = UnquantizedEmbeddingMethod()
    return h


@pytest.mark.parametrize("tp", [1, 2])
def test_draft_logits_equal_the_target_rows(tp):
    torch.manual_seed(0)
    V, H = 100, 8
    W = torch.randn(V, H)
    # skewed to rank 0 so the ranks hold different counts and rank 1 is padded
    draft_ids = torch.tensor([2, 0, 63, 5, 64, 99, 7, 40, 11])
    heads = [DraftLMHead(shard(W, r, tp), draft_ids) for r in range(tp)]
    h = torch.randn(5, H)
    # what all_gather hands every rank: the ranks' local logits side by side
    logits = torch.cat([F.linear(h, d.weight) for d in heads], -1)
    if heads[0].pad_bias is not None:
        logits = logits + heads[0].pad_bias
    ids = heads[0].token_ids
    assert all(torch.equal(d.token_ids, ids) for d in heads)
    cols = heads[0].valid_cols
    assert sorted(heads[0].valid_ids.tolist()) == sorted(draft_ids.tolist())
    assert torch.allclose(logits[:, cols], h @ W[ids[cols]].T, atol=1e-6)
    pads = torch.ones(ids.numel(), dtype=torch.bool)
    pads[cols] = False
    assert pads.sum() == (0 if tp == 1 else 7 - 2)  # rank 0 holds 7 of the ids, rank 1 holds 2
    assert torch.isinf(logits[:, pads]).all() and (logits[:, pads] < 0).all()
    if tp == 1:
        assert torch.equal(ids, draft_ids)  # one rank: serving order is the stored order
        full = heads[0].full_logits(h)
        ref = torch.full((5, V), float("-inf"))
        ref[:, draft_ids] = h @ W[draft_ids].T
        assert torch.allclose(full, ref, atol=1e-6)


@pytest.mark.parametrize("ids,needle", [
    ([1, 1, 2], "distinct"), ([0, 100], "[0, 100)"), ([-1, 3], "[0, 100)")])
def test_bad_draft_ids_are_one_line(ids, needle):
    with pytest.raises(UserError, match=r"d2t") as e:
        DraftLMHead(shard(torch.randn(100, 4), 0, 1), torch.tensor(ids))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_quantized_lm_head_is_refused():
    head = shard(torch.randn(100, 4), 0, 1)
    head.quant_method = object()
    with pytest.raises(UserError, match="unquantized target lm_head"):
        DraftLMHead(head, torch.tensor([1, 2]))
