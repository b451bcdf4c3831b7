"""Tiny, fully local models for tests, the bench and the offline demo.

Nothing here touches a model hub. Everything is deterministic for a given seed.

- `make_tokenizer`: a byte-level BPE trained in-process on a fixed text.
- `make_target`: a small random Llama. With `bigram=True` every `o_proj` and
  `down_proj` is zero, so the residual stream is the token embedding and the
  target's next token depends only on the current token (a random bigram table).
- `make_identity_head`: an EAGLE-1/HASS head whose fc is [c*I | 0] and whose
  attention/MLP outputs are zero: it returns c * embed(token fed), so against a
  bigram target its greedy draft equals the target's greedy token (100% acceptance).
  A large `fc_bias` breaks that, which proves the bias is applied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_hass.head import HassHead, HeadConfig

_CORPUS = """
The quick brown fox jumps over the lazy dog. Speculative decoding drafts several
tokens with a small model and verifies them with the large one in a single pass.
A draft tree lets the target check many continuations at once; the longest
accepted path is kept and the rest is thrown away. def add(a, b): return a + b
for i in range(10): print(i * i) # squares of the first ten numbers
Once upon a time there was a little robot who wanted to learn how to write poems.
""" * 4


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))


def llama_config_dict(
    vocab_size: int,
    hidden_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def make_target(
    out_dir: str | os.PathLike,
    *,
    bigram: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    with_tokenizer: bool = True,
    context: float = 1.0,
    sharp: float = 1.0,
    **shape,
) -> Path:
    """A random Llama target saved in HF format (safetensors + config + tokenizer).

    `context` scales every o_proj/down_proj (1 = a random Llama, 0 = the bigram
    target): below 1 the next token mostly follows the current one, so a head that
    knows the bigram table is often but not always right. `sharp` scales q_proj and
    k_proj: random init attends almost uniformly (logit std ~0.05), which hides wrong
    positions and masks; at sharp ~8 each query attends to a few keys, so an
    off-by-one RoPE position or a sibling leaking through a tree mask changes logits.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        make_tokenizer(out, vocab_size or 512)
        from transformers import AutoTokenizer

        vocab_size = len(AutoTokenizer.from_pretrained(str(out)))
    cfg_dict = llama_config_dict(vocab_size or 512, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg_dict)).float()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k].mul_(0.0 if bigram else context)
        elif k.endswith(QK):
            sd[k].mul_(sharp)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1})
    )
    return out


QK = ("q_proj.weight", "k_proj.weight")


def target_config(target_dir: str | os.PathLike) -> dict:
    return json.loads((Path(target_dir) / "config.json").read_text())


def head_config_for(target: dict, **flags) -> HeadConfig:
    keys = {k: target[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size") }
    return HeadConfig(
        **keys,
        head_dim=target.get("head_dim"),
        rms_norm_eps=target.get("rms_norm_eps", 1e-5),
        rope_theta=target.get("rope_theta", 10000.0),
        rope_scaling=target.get("rope_scaling"),
        max_position_embeddings=target.get("max_position_embeddings", 2048),
        **flags,
    )


def identity_head_state(cfg: HeadConfig, scale: float = 1.0, fc_bias: float | None = None,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of the identity head (see module doc); other weights random but inert."""
    torch.manual_seed(seed)
    head = HassHead(HeadConfig(**{**cfg.__dict__, "fc_bias": fc_bias is not None}))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sd = head.head_state_dict()
    H = cfg.hidden_size
    sd["fc.weight"] = torch.cat((scale * torch.eye(H), torch.zeros(H, H)), dim=1)
    if fc_bias is not None:
        sd["fc.bias"] = torch.full((H,), float(fc_bias)) * torch.sign(torch.randn(H))
    sd["layers.0.self_attn.o_proj.weight"].zero_()
    sd["layers.0.mlp.down_proj.weight"].zero_()
    sd["layers.0.post_attention_layernorm.weight"].fill_(1.0)
    for k in list(sd):
        if k.endswith("layernorm.weight") or k.endswith("norm.weight"):
            sd[k] = torch.ones_like(sd[k])
    return {k: v.contiguous() for k, v in sd.items()}


def random_head_state(cfg: HeadConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    head = HassHead(cfg)
    for name, p in head.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return {k: v.detach().contiguous() for k, v in head.head_state_dict().items()}


def attentive_head_state(cfg: HeadConfig, seed: int = 0, scale: float = 20.0, attention: float = 30.0,
                         sharp: float = 30.0, hidden: float = 0.05) -> dict[str, torch.Tensor]:
    """A head whose drafts depend on everything the drafter feeds it: an identity path
    (`scale` * embedding of the token fed) plus sharp random attention with a large
    o_proj (`attention`, `sharp`) and a random projection of the target's hidden state
    (`hidden`). Measured with the oracle on `make_target(context=0.3, sharp=8)`: shifting
    the draft's RoPE positions by one changes 13% of chains and 36% of 4/3/10 trees, and
    feeding the first pass the previous position's hidden state 46% / 96%.
    Optional modules named in `cfg` (fc_bias and the norms) get random, non-trivial
    weights, so dropping any of them changes the drafts."""
    sd = identity_head_state(cfg, scale=scale, seed=seed,
                             fc_bias=0.0 if cfg.fc_bias else None)
    g = torch.Generator().manual_seed(seed + 7)
    H = cfg.hidden_size
    sd["fc.weight"][:, H:] = hidden * scale * 0.02 * torch.randn(H, H, generator=g) / H**0.5
    for k in QK:
        w = sd[f"layers.0.self_attn.{k}"]
        sd[f"layers.0.self_attn.{k}"] = torch.randn(w.shape, generator=g) * 0.02 * sharp / scale**0.5
    o = sd["layers.0.self_attn.o_proj.weight"]
    sd["layers.0.self_attn.o_proj.weight"] = torch.randn(o.shape, generator=g) * 0.02 * attention
    if cfg.fc_bias:
        sd["fc.bias"] = 0.3 * scale * 0.02 * torch.randn(H, generator=g)
    for name in ("embed_norm.weight", "hidden_norm.weight", "layers.0.input_layernorm.weight",
                 "lm_head_norm.weight"):
        if name in sd:
            sd[name] = 1.0 + 0.5 * torch.randn(H, generator=g)
    return {k: v.contiguous() for k, v in sd.items()}
