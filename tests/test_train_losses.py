import math

import torch

from vllm_hass.train.losses import feature_loss, soft_ce, top_k, topk_loss


def test_topk_loss_hand_made():
    # one position, vocabulary of 4
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.5, 0.05, 0.25, 0.2]])
    ids, qk = top_k(q, 2)  # tokens 0 and 2
    assert ids.tolist() == [[0, 2]]
    loss = topk_loss(p.log(), ids, qk, torch.ones(1))
    expected = -(0.5 * math.log(0.1) + 0.25 * math.log(0.3))
    assert abs(loss.item() - expected) < 1e-5


def test_topk_with_k_equal_vocab_is_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 7, 50, generator=g).log_softmax(-1)
    q = torch.randn(3, 7, 50, generator=g).softmax(-1)
    mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    ids, qk = top_k(q, 50)
    torch.testing.assert_close(topk_loss(logp, ids, qk, mask), soft_ce(logp, q, mask))
    # and a smaller K leaves out some of the mass, so it is strictly smaller
    ids, qk = top_k(q, 5)
    assert topk_loss(logp, ids, qk, mask) < soft_ce(logp, q, mask)


def test_masked_positions_do_not_count():
    logp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    only_first = soft_ce(logp, q, torch.tensor([[1.0, 0.0]]))
    assert abs(only_first.item() - math.log(2)) < 1e-4
    out, tgt = torch.zeros(1, 2, 3), torch.tensor([[[0.5] * 3, [10.0] * 3]])
    # SmoothL1: 0.5*x^2 below 1, |x|-0.5 above
    assert abs(feature_loss(out, tgt, torch.tensor([[1.0, 0.0]])).item() - 0.125) < 1e-4
    assert abs(feature_loss(out, tgt, torch.tensor([[0.0, 1.0]])).item() - 9.5) < 1e-3
