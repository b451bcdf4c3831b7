"""Harmonized context alignment: the step-j training forward must equal running the
head j times autoregressively, with a growing K/V cache, on the same inputs."""

import pytest
import torch

from vllm_hass.head import HassHead, HeadConfig
from vllm_hass.train.hca import hca_mask, next_hidden, step_forward

H = 32


def make_head(seed=0, dtype=torch.float64, **flags):
    cfg = HeadConfig(hidden_size=H, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=50, rope_theta=10000.0, **flags)
    torch.manual_seed(seed)
    head = HassHead(cfg).to(dtype)
    # Large weights: attention far from uniform, so a wrong key would show.
    for name, p in head.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.3)
    return head


def train_outputs(head, embeds, feats, steps):
    """out_j at every position for j = 1..steps, as the trainer computes them."""
    L = embeds.shape[1]
    pos = torch.arange(L)[None].expand(embeds.shape[0], L)
    hiddens, outs = [feats], []
    for _ in range(steps):
        out = step_forward(head, embeds, hiddens, pos)
        outs.append(out)
        hiddens.append(next_hidden(feats, out))
    return outs


def decode_outputs(head, embeds, feats, c, steps):
    """Decode time: prefill positions 0..c on target features (step 1), then each
    further step feeds back the previous output at the next position."""
    B = embeds.shape[0]
    pos = torch.arange(c + 1)[None].expand(B, -1)
    out, (k, v) = head(embeds[:, :c + 1], feats[:, :c + 1], pos)
    outs = [out[:, c]]
    for j in range(2, steps + 1):
        p = c + j - 1
        o, (k1, v1) = head(embeds[:, p:p + 1], outs[-1][:, None],
                           torch.full((B, 1), p), past_kv=(k, v))
        k, v = torch.cat((k, k1), 2), torch.cat((v, v1), 2)
        outs.append(o[:, 0])
    return outs


ALL_FLAGS = {"fc_bias": True, "input_layernorm": True, "embed_norm": True, "hidden_norm": True}


@pytest.mark.parametrize("dtype,tol,flags", [(torch.float64, 1e-10, {}),
                                             (torch.float64, 1e-10, ALL_FLAGS),
                                             (torch.float32, 5e-4, {})])
def test_step_j_equals_incremental_decode(dtype, tol, flags):
    head = make_head(dtype=dtype, **flags)
    B, L, steps = 2, 13, 3
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype)
    feats = torch.randn(B, L, H, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        outs = train_outputs(head, embeds, feats, steps)
        for c in (0, 1, 4, 7, L - steps):
            dec = decode_outputs(head, embeds, feats, c, steps)
            for j in range(1, steps + 1):
                torch.testing.assert_close(outs[j - 1][:, c + j - 1], dec[j - 1],
                                           rtol=tol, atol=tol)


def test_plain_causal_training_does_not_match_decode():
    """The check above can fail: EAGLE-style training (target features as every step's
    context) gives a different step-2 output than decoding does."""
    head = make_head()
    B, L = 1, 9
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    feats = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out1 = head(embeds, feats, torch.arange(L)[None])[0]
        # step 2 with the shifted step-1 output as input but plain causal attention
        # over its own K/V: what training without the HCA mask would do
        naive = head(embeds, next_hidden(feats, out1), torch.arange(L)[None])[0]
        c = 4
        dec = decode_outputs(head, embeds, feats, c, 2)
    assert (naive[:, c + 1] - dec[1]).abs().max() > 0.1


def test_mask_blocks():
    m = hca_mask(5, 3)[0, 0].int()
    # query 4, step 3: context end c = 2 -> block 1 keys 0..2, block 2 key 3, block 3 key 4
    assert m[4].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]
    assert torch.equal(hca_mask(6, 1)[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert bool(m.any(-1).all())  # every query sees at least itself
