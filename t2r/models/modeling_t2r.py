"""The converted decoder: Llama/Mistral/Qwen2 blocks whose attention may be Gated Slot Attention.

Module and parameter names are the teacher's (``model.layers.N.self_attn.q_proj`` ...), so the
teacher's weights load as they are, LoRA targets and FSDP wrapping work unchanged, and only the
modules named in ``T2RPreTrainedModel.gsa_new_modules`` are new in converted layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from t2r.layers.attention import AttentionContext, SoftmaxAttention
from t2r.layers.gsa import GatedSlotAttention
from t2r.layers.norm import RMSNorm
from t2r.layers.rotary import RotaryEmbedding

from .cache import T2RCache
from .configuration_t2r import T2RConfig


# The name of the cache in model outputs: `past_key_values` up to transformers 5.2x, `cache` after.
CACHE_OUTPUT_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs) -> T2RCache | None:
    """The cache of a model output, whichever transformers made it."""
    return outputs.get(CACHE_OUTPUT_KEY)


@dataclass
class TransferOutput(ModelOutput):
    """Attention transfer: ``loss`` (summed over GSA layers and real tokens) and ``layer_errors``
    [num GSA layers] (each layer's sum over real tokens of its per-token mean squared error)."""

    loss: torch.Tensor | None = None
    layer_errors: torch.Tensor | None = None


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class T2RDecoderLayer(nn.Module):
    def __init__(self, config: T2RConfig, layer_idx: int):
        super().__init__()
        attn_cls = GatedSlotAttention if config.is_gsa_layer(layer_idx) else SoftmaxAttention
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: AttentionContext, cache: T2RCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class T2RPreTrainedModel(PreTrainedModel):
    config_class = T2RConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["T2RDecoderLayer"]
    # What a conversion adds to a GSA layer (modules under ``self_attn``; which exist depends on the
    # conversion options): the gate projection, learnable feature maps, the output norm and the
    # window mix. Everything else is the teacher's. Convert, training stages and export read this.
    gsa_new_modules = ("f_proj", "q_map", "k_map", "g_norm", "window_mix")
    # the output norm and the window mix stay fp32 under bf16 and fp16
    _keep_in_fp32_modules_strict = ["g_norm", "window_mix"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own T2RCache


def keeps_fp32(param_name: str) -> bool:
    """Whether this parameter stays fp32 whatever the weights' dtype (the output norm, the window mix)."""
    return any(part in T2RPreTrainedModel._keep_in_fp32_modules_strict for part in param_name.split("."))


def _cu_seqlens_to_doc_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    return ids.view(B, T)


def _doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its packed document: 0, 1, ... restarting at each one."""
    flat = doc_ids.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    return (idx - first).view_as(doc_ids)


class T2RModel(T2RPreTrainedModel):
    def __init__(self, config: T2RConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(T2RDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def context(self, h, attention_mask, position_ids, cu_seqlens, past: int) -> AttentionContext:
        B, T = h.shape[:2]
        doc_ids = None
        if cu_seqlens is not None:
            if past or attention_mask is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache or an attention_mask")
            if int(cu_seqlens[-1]) != B * T:
                raise ValueError(f"cu_seqlens must end at batch x length = {B * T}, got {int(cu_seqlens[-1])}")
            rows = torch.arange(0, B * T + 1, T, device=cu_seqlens.device)
            if not bool(torch.isin(rows, cu_seqlens.to(rows.device)).all()):
                raise ValueError(f"cu_seqlens must contain every row boundary (multiples of {T}): "
                                 "a packed document may not continue into the next row")
            doc_ids = _cu_seqlens_to_doc_ids(cu_seqlens, B, T)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                    f"(batch, cached + new tokens)"
                )
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is None:
            if doc_ids is not None:
                position_ids = _doc_positions(doc_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device).expand(B, T)
        cos, sin = self.rotary_emb(position_ids, h.dtype)
        return AttentionContext(cos=cos, sin=sin, key_mask=attention_mask, cu_seqlens=cu_seqlens, doc_ids=doc_ids,
                                positions=position_ids)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: T2RCache | None = None,
                inputs_embeds=None, cu_seqlens=None, output_hidden_states: bool = False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        ctx = self.context(h, attention_mask, position_ids, cu_seqlens, past)
        hidden = [h] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, cache, use_reentrant=False)
            else:
                h = layer(h, ctx, cache)
            if hidden is not None:
                hidden.append(h)
        if cache is not None:
            cache.advance(h.shape[1])
        h = self.norm(h)
        if hidden is not None:
            hidden[-1] = h
        return h, (tuple(hidden) if hidden is not None else None)


class T2RForCausalLM(T2RPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: T2RConfig):
        super().__init__(config)
        self.model = T2RModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                cache=None, inputs_embeds=None, labels=None, use_cache=None, cu_seqlens=None,
                logits_to_keep: int = 0, output_hidden_states: bool = False, attention_transfer: bool = False,
                return_dict=None, **kwargs):
        """Causal LM forward. ``cu_seqlens`` ([N + 1] offsets over the flattened batch) marks
        packed documents: no state or attention crosses a boundary. ``labels`` are shifted inside;
        -100 is ignored.

        ``attention_transfer=True``: every GSA layer is fed the teacher's hidden states and the
        output's ``loss`` is the sum over GSA layers and real tokens of the per-token mean squared
        error between the layer's output and the teacher's softmax attention output (no logits).
        """
        if attention_transfer:
            return self._attention_transfer(input_ids, attention_mask, position_ids, cu_seqlens)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        if use_cache and cache is None and cu_seqlens is None:
            cache = T2RCache(self.config.num_hidden_layers)
        h, hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, cu_seqlens,
                               output_hidden_states)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, cu_seqlens)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden, **{CACHE_OUTPUT_KEY: cache})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen; positions follow the attention mask so a
        left-padded row decodes like the same prompt alone."""
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if isinstance(cache, T2RCache) else 0
        inputs = {"cache": cache if isinstance(cache, T2RCache) else None, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        return inputs

    def _attention_transfer(self, input_ids, attention_mask, position_ids, cu_seqlens):
        layers = [m for m in self.modules() if isinstance(m, GatedSlotAttention)]
        checkpointing = self.model.gradient_checkpointing
        # No activation checkpointing here: the trunk keeps no graph (the teacher's hidden states
        # flow on), and a recompute in backward would run outside transfer mode.
        self.model.gradient_checkpointing = False
        for m in layers:
            m.transfer = True
        try:
            self.model(input_ids, attention_mask, position_ids, None, None, cu_seqlens)
            errors = torch.stack([m.transfer_error for m in layers])  # [layers, B, T]
        finally:
            self.model.gradient_checkpointing = checkpointing
            for m in layers:
                m.transfer, m.transfer_error = False, None
        if attention_mask is not None:
            errors = errors * attention_mask[None, :, -errors.shape[-1]:].to(errors.dtype)
        return TransferOutput(loss=errors.sum(), layer_errors=errors.sum((1, 2)))

    @contextlib.contextmanager
    def teacher_mode(self):
        """Run every GSA layer as the teacher's softmax attention (same weights) inside the block."""
        layers = [m for m in self.modules() if isinstance(m, GatedSlotAttention)]
        before = [m.as_teacher for m in layers]
        for m in layers:
            m.as_teacher = True
        try:
            yield self
        finally:
            for m, b in zip(layers, before):
                m.as_teacher = b

    @contextlib.contextmanager
    def window_branches(self, window: bool = True, gsa: bool = True):
        """Inside the block, windowed GSA layers use only the named branches (an inference
        ablation: ``window=False`` reads only the GSA state, ``gsa=False`` only the window)."""
        layers = [m for m in self.modules() if isinstance(m, GatedSlotAttention)]
        for m in layers:
            m.branches = {"window": window, "gsa": gsa}
        try:
            yield self
        finally:
            for m in layers:
                m.branches = {"window": True, "gsa": True}

    def gsa_state_nbytes(self, batch_size: int = 1) -> int:
        """Recurrent state of all GSA layers for ``batch_size`` sequences, in bytes (fp32); with a
        window, the ring buffer of the last W tokens too (in the weights' dtype)."""
        c = self.config
        per_layer = c.num_key_value_heads * c.num_slots * 2 * c.head_dim * 4
        if c.window_size:
            per_token = c.num_key_value_heads * (4 * c.head_dim + 2 * c.num_slots) * self.dtype.itemsize + 1
            per_layer += c.window_size * per_token
        return batch_size * per_layer * len(c.gsa_layers)


def next_token_targets(labels: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """The token each position must predict (-100: none): labels shifted left by one, and with
    packed documents nothing across a boundary (a document's last token predicts nothing)."""
    target = torch.full_like(labels, -100)
    if cu_seqlens is None:
        target[:, :-1] = labels[:, 1:]
        return target
    flat, shifted = labels.reshape(-1), target.view(-1)
    shifted[:-1] = flat[1:]
    ends = cu_seqlens[1:].long().to(labels.device) - 1
    shifted[ends[ends >= 0]] = -100
    return target


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens=None, reduction: str = "mean"):
    """Next-token cross-entropy over the positions that have a target (mean, or sum)."""
    target = next_token_targets(labels, cu_seqlens)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction=reduction)
