"""The HASS / EAGLE-1 draft head as a vLLM model.

Same computation and weight names as `vllm_hass.head.HassHead` (the plain-torch
reference), built from vLLM's layers so it gets paged KV cache, tensor
parallelism and torch.compile. What stock `EagleLlamaForCausalLM` gets wrong
for these heads, and this class does instead:
- `fc.bias` is created and loaded (stock drops it silently);
- optional norms (`embed_norm`, `hidden_norm`, `layers.0.input_layernorm`,
  `lm_head_norm`) are applied when the checkpoint has them (stock refuses the
  input layernorm and ignores the others);
- loading is strict: an unknown, missing or mis-shaped weight is an error that
  names it;
- a draft vocabulary stored with the head (`d2t`/`t2d`, EAGLE-3's names) gives the
  draft an lm_head over those rows only (draft_lm_head.py).
"""


from collections.abc import Iterable

import torch
import torch.nn as nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import get_draft_quant_config, maybe_prefix

from vllm_hass.head import OPTIONAL_WEIGHTS

# checkpoint name fragment -> (fused vLLM parameter fragment, shard id)
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def hass_flags(config) -> dict:
    flags = getattr(config, "hass", None) or {}
    return {name: bool(flags.get(name, False)) for name in OPTIONAL_WEIGHTS} | {
        "has_embed_tokens": bool(flags.get("has_embed_tokens", False)),
        "has_lm_head": bool(flags.get("has_lm_head", False)),
    }


class _SharedFromTarget(nn.Module):
    """Stands in for a tensor the head does not own until vLLM's proposer swaps in
    the target's (`_maybe_share_embeddings`); avoids allocating a vocab-sized copy."""

    weight = None

    def forward(self, *args):
        raise RuntimeError("HASS head: embed_tokens was not shared from the target model")


class _DecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str, config, input_layernorm: bool):
        super().__init__(vllm_config, prefix=prefix, config=config)
        if not input_layernorm:
            # EAGLE-1 layout: the fc output goes into attention un-normalised.
            self.input_layernorm = nn.Identity()

    def get_quant_config(self, vllm_config: VllmConfig):
        return get_draft_quant_config(vllm_config)


@support_torch_compile
class HassModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0):
        super().__init__()
        config = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        flags = hass_flags(config)
        H, eps = config.hidden_size, config.rms_norm_eps
        if flags["has_embed_tokens"]:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, H, prefix=maybe_prefix(prefix, "embed_tokens")
            )
        else:
            self.embed_tokens = _SharedFromTarget()
        # Layer names must not collide with the target's: the drafter gets its own
        # KV cache entries under model.layers.<num_target_layers>.
        self.layers = nn.ModuleList(
            [
                _DecoderLayer(
                    vllm_config,
                    prefix=maybe_prefix(prefix, f"layers.{start_layer_id}"),
                    config=config,
                    input_layernorm=flags["input_layernorm"],
                )
            ]
        )
        self.fc = ReplicatedLinear(
            input_size=2 * H,
            output_size=H,
            bias=flags["fc_bias"],
            params_dtype=vllm_config.model_config.dtype,
            quant_config=get_draft_quant_config(vllm_config),
            prefix=maybe_prefix(prefix, "fc"),
            return_bias=False,
        )
        self.embed_norm = RMSNorm(H, eps=eps) if flags["embed_norm"] else None
        self.hidden_norm = RMSNorm(H, eps=eps) if flags["hidden_norm"] else None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_tokens(input_ids)
        if self.embed_norm is not None:
            embeds = self.embed_norm(embeds)
        if self.hidden_norm is not None:
            hidden_states = self.hidden_norm(hidden_states)
        x = self.fc(torch.cat((embeds, hidden_states), dim=-1))
        x, residual = self.layers[0](positions, x, None)
        out = x + residual
        return out, out


class EagleHassLlamaForCausalLM(LlamaForCausalLM):
    """Registered with vLLM's ModelRegistry under this name (see plugin.py)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        flags = hass_flags(config)
        # Read by vLLM's proposer to decide whether to share the target's tensors.
        self.has_own_embed_tokens = flags["has_embed_tokens"]
        self.has_own_lm_head = flags["has_lm_head"]
        if getattr(config, "draft_vocab_size", None) is None:
            config.draft_vocab_size = config.vocab_size
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = HassModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
            start_layer_id=target_layers,
        )
        if flags["has_lm_head"]:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
            )
        self.lm_head_norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if flags["lm_head_norm"] else None
        )
        self.logits_processor = LogitsProcessor(
            config.vocab_size, scale=getattr(config, "logit_scale", 1.0)
        )
        # hass.json's resolved draft_vocab_size (config.resolve_draft_vocab); 0 = full.
        self.draft_vocab_size = int(getattr(config, "hass_draft_vocab_size", 0) or 0)
        self.stored_d2t: torch.Tensor | None = None  # [stored Vd] from draft_vocab.safetensors
        self.draft_vocab = None  # DraftLMHead, built by use_draft_vocab() once lm_head is shared

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden_states: torch.Tensor, inputs_embeds: torch.Tensor | None = None):
        if inputs_embeds is not None:
            raise NotImplementedError("HASS heads take token ids, not input embeddings")
        return self.model(input_ids, positions, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.lm_head_norm is not None:
            hidden_states = self.lm_head_norm(hidden_states)
        if self.draft_vocab_size and self.draft_vocab is None:
            # vLLM's own EAGLE loop (chains on CUDA) has no hook after it shares the
            # lm_head: build on the first call, which is its dummy run at start-up.
            self.use_draft_vocab()
        if self.draft_vocab is not None:
            return self.draft_vocab.full_logits(hidden_states)
        return self.logits_processor(self.lm_head, hidden_states)

    def compute_draft_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, Vd'] logits over the draft vocabulary (columns: draft_token_ids),
        or over the full vocabulary without one."""
        if self.draft_vocab is None:
            return self.compute_logits(hidden_states)
        if self.lm_head_norm is not None:
            hidden_states = self.lm_head_norm(hidden_states)
        return self.draft_vocab.logits(hidden_states)

    @property
    def draft_token_ids(self) -> torch.Tensor | None:
        """[Vd'] target id of each draft logit column; None = the identity (full vocabulary)."""
        return None if self.draft_vocab is None else self.draft_vocab.token_ids

    def use_draft_vocab(self) -> None:
        """Cut the draft's lm_head rows from the (shared) lm_head: call after load_model."""
        from vllm_hass.draft_lm_head import DraftLMHead
        from vllm_hass.errors import UserError

        n = self.draft_vocab_size
        if n == 0:
            return
        if self.stored_d2t is None:
            raise UserError(f"hass.json: 'draft_vocab_size' is {n} but the head has no "
                            "draft_vocab.safetensors (build one with `vllm-hass vocab`)")
        ids = (torch.arange(self.stored_d2t.numel()) + self.stored_d2t.cpu())[:n]
        self.draft_vocab = DraftLMHead(self.lm_head, ids, scale=getattr(self.config, "logit_scale", 1.0))

    def _param_name(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (vLLM parameter name, shard id or None)."""
        if name == "lm_head.weight":
            return name, None
        if name == "lm_head_norm.weight":
            return name, None
        name = "model." + name
        for frag, (fused, shard) in STACKED.items():
            if frag in name:
                return name.replace(frag, fused), shard
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict loading through vLLM's sharded weight loaders.

        Checkpoint tensors are checked against the head's full (unsharded) shapes,
        so the check means the same at every tensor-parallel size; each tensor then
        goes through its parameter's `weight_loader`, which takes this rank's shard
        (QKV and gate/up fused column-parallel, o/down row-parallel, vocab-parallel
        embed_tokens/lm_head) or copies it whole (fc, fc.bias, norms: replicated).
        """
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        from vllm_hass.converters.layout import expected_shapes
        from vllm_hass.head import HeadConfig

        full = expected_shapes(HeadConfig.from_dict(self.config.to_dict()))
        expected = self._expected_checkpoint_names()
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            if ckpt_name in ("d2t", "t2d"):
                self._load_vocab(ckpt_name, tensor)
                continue
            name, shard = self._param_name(ckpt_name)
            param = params.get(name)
            if param is None or ckpt_name not in expected:
                raise ValueError(
                    f"HASS head: unexpected weight '{ckpt_name}' (this head's config "
                    f"has no such module; flags {hass_flags(self.config)})"
                )
            if tuple(tensor.shape) != tuple(full[ckpt_name]):
                raise ValueError(
                    f"HASS head: weight '{ckpt_name}' has shape {list(tensor.shape)}, "
                    f"expected {list(full[ckpt_name])}"
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(ckpt_name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"HASS head: missing weight '{missing[0]}'"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        # vLLM reports what it loaded under the module's own parameter names.
        return {self._param_name(n)[0] for n in loaded}

    def _load_vocab(self, name: str, tensor: torch.Tensor) -> None:
        """The draft vocabulary (EAGLE-3 convention): d2t [Vd] int64 offsets (target id =
        draft id + d2t), t2d [V] bool membership. Checked with the head's config; t2d
        carries nothing d2t does not."""
        stored = getattr(self.config, "draft_vocab_size", None)
        want = {"d2t": ((stored,), torch.int64), "t2d": ((self.config.vocab_size,), torch.bool)}[name]
        if tuple(tensor.shape) != want[0] or tensor.dtype != want[1]:
            raise ValueError(f"HASS head: '{name}' is {tensor.dtype} {list(tensor.shape)}, expected "
                             f"{want[1]} {list(want[0])} (config.json draft_vocab_size {stored})")
        if name == "d2t":
            self.stored_d2t = tensor.clone()

    def _expected_checkpoint_names(self) -> set[str]:
        from vllm_hass.converters.layout import REQUIRED

        flags = hass_flags(self.config)
        names = set(REQUIRED)
        names |= {OPTIONAL_WEIGHTS[k] for k in OPTIONAL_WEIGHTS if flags[k]}
        if flags["has_embed_tokens"]:
            names.add("embed_tokens.weight")
        if flags["has_lm_head"]:
            names.add("lm_head.weight")
        return names
