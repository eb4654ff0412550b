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
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from t2r.kernels.gsa.utils import sequence_bounds
from t2r.layers.attention import AttentionContext, SoftmaxAttention, TransferErrors
from t2r.layers.gla import GatedLinearAttention
from t2r.layers.gsa import GatedSlotAttention
from t2r.layers.norm import RMSNorm
from t2r.layers.rotary import RotaryEmbedding

from .cache import T2RCache
from .configuration_t2r import T2RConfig
from .lm_loss import token_cross_entropy
from .static_cache import T2RStaticCache
from .step_graph import run_step


# The name of the cache in model outputs: `past_key_values` up to transformers 5.2x, `cache` after.
CACHE_OUTPUT_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
BASE_CACHE_OUTPUT_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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


# The layer class of each ``mixer`` (every one a GatedSlotAttention: transfer, teacher mode and the window
# ablation find converted layers by that class).
MIXER_LAYERS = {"gsa": GatedSlotAttention, "gla": GatedLinearAttention, "linear": GatedLinearAttention}


class T2RDecoderLayer(nn.Module):
    def __init__(self, config: T2RConfig, layer_idx: int):
        super().__init__()
        attn_cls = MIXER_LAYERS[config.mixer] if config.is_gsa_layer(layer_idx) else SoftmaxAttention
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
    # conversion options): the gate projection (GSA's f_proj, GLA's low-rank gk_proj), learnable feature
    # maps, the output norm and the window mix. Everything else is the teacher's. Convert, training stages
    # and export read this.
    gsa_new_modules = ("f_proj", "gk_proj", "q_map", "k_map", "g_norm", "window_mix")
    # the output norm and the window mix stay fp32 under bf16 and fp16
    _keep_in_fp32_modules_strict = ["g_norm", "window_mix"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own T2RCache


def keeps_fp32(param_name: str) -> bool:
    """Whether this parameter (or module) stays fp32 whatever the weights' dtype (the output norm, the window
    mix)."""
    return any(part in T2RPreTrainedModel._keep_in_fp32_modules_strict for part in param_name.split("."))


def gsa_new_module(param_name: str) -> str | None:
    """The module of ``gsa_new_modules`` this parameter belongs to; None for the teacher's parameters. Names
    wrapped by peft (``base_model.model.`` ..., ``modules_to_save``) are read the same."""
    parts = param_name.split(".")
    for parent, part in zip(parts, parts[1:]):
        if parent == "self_attn" and part in T2RPreTrainedModel.gsa_new_modules:
            return part
    return None


def _cu_seqlens_to_doc_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                  output_size=B * T)  # the size given: no wait for the device
    return ids.view(B, T)


def _doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its packed document: 0, 1, ... restarting at each one."""
    flat = doc_ids.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    return (idx - first).view_as(doc_ids)


def _starts_to_cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """Offsets [N + 1] over the flattened batch from a [B, T] bool marking each document's first
    token (every row starts one)."""
    starts = starts.clone()
    starts[:, 0] = True
    first = starts.reshape(-1).nonzero().flatten()
    return torch.cat([first, first.new_tensor([starts.numel()])])


def _same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a.long() == b.to(a.device).long()).all())


def _has_padding(attention_mask) -> bool:
    return attention_mask is not None and not bool(attention_mask.bool().all())


def packed_cu_seqlens(B: int, T: int, *, attention_mask=None, position_ids=None, past: int = 0, cu_seqlens=None,
                      cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                      seq_idx=None) -> torch.Tensor | None:
    """The packed documents of a B x T batch as offsets [N + 1] over its flattened tokens, however the
    caller marked them, or None (each row is one sequence). The forms, which must agree when several
    are given:

    - ``cu_seqlens``: t2r's own (``t2r.train.data.collate``);
    - ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q`` / ``max_length_k``, checked):
      transformers' flash-attention kwargs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``,
      TRL's padding-free collator);
    - ``seq_idx`` [B, T]: the document index of each token (TRL's padding-free collator);
    - ``position_ids`` that restart at 0 inside a row (TRL's padding-free collator,
      ``DataCollatorWithFlattening``): a document starts at every 0, as transformers reads them for
      flash attention. Read so only when nothing else marks documents, without a cache and without
      padding (no ``attention_mask``, or one of all ones); otherwise position ids are only positions.
    """
    given = [(n, c) for n, c in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q),
                                  ("cu_seq_lens_k", cu_seq_lens_k)) if c is not None]
    for name, c in given:
        if not torch.is_tensor(c) or c.ndim != 1 or c.dtype.is_floating_point or c.dtype == torch.bool:
            got = f"{c.dtype} of shape {tuple(c.shape)}" if torch.is_tensor(c) else type(c).__name__
            raise ValueError(f"{name} must be a 1-D integer tensor of document offsets [N + 1], got {got}")
    cu, source = (given[0][1], given[0][0]) if given else (None, None)
    for name, c in given[1:]:
        if not _same_offsets(cu, c):
            raise ValueError(f"{source} and {name} mark different documents ({cu.tolist()} and {c.tolist()}); "
                             "a decoder's queries and keys are the same tokens")
    if seq_idx is not None:
        if not torch.is_tensor(seq_idx) or tuple(seq_idx.shape) != (B, T):
            got = tuple(seq_idx.shape) if torch.is_tensor(seq_idx) else type(seq_idx).__name__
            raise ValueError(f"seq_idx must give each token's document index, shape {(B, T)} (batch, length); "
                             f"got {got}")
        starts = torch.zeros(B, T, dtype=torch.bool, device=seq_idx.device)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        from_idx = _starts_to_cu_seqlens(starts)
        if cu is None:
            cu, source = from_idx, "seq_idx"
        elif not _same_offsets(cu, from_idx):
            raise ValueError(f"{source} and seq_idx mark different documents ({cu.tolist()} and {from_idx.tolist()})")
    if cu is None and position_ids is not None and past == 0 and not _has_padding(attention_mask) and T > 1:
        if position_ids.ndim == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == T:
            restarts = position_ids.expand(B, T)[:, 1:] == 0
            if bool(restarts.any()):
                cu = _starts_to_cu_seqlens(F.pad(restarts, (1, 0), value=True))
                source = "position_ids"
    for name, longest in (("max_length_q", max_length_q), ("max_length_k", max_length_k)):
        if longest is None:
            continue
        if cu is None:
            raise ValueError(f"{name} was given but no packed documents (cu_seq_lens_q / cu_seq_lens_k)")
        actual = int((cu[1:] - cu[:-1]).max())
        if int(longest) != actual:
            raise ValueError(f"{name}={int(longest)}, but the longest document that {source} marks has {actual} tokens")
    return cu


def _pick_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two caches given: pass it as cache or as past_key_values, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, T2RCache):
        raise TypeError(f"the cache must be a T2RCache (GSA states, window buffers, softmax keys and values), got "
                        f"{type(cache).__name__}; leave it out and the model makes its own")
    return cache


def _refuse_attention_weights(output_attentions) -> None:
    if output_attentions:
        raise ValueError("output_attentions=True: a converted model returns no attention weights (GSA layers "
                         "compute none, softmax layers run fused attention)")


class T2RModel(T2RPreTrainedModel):
    def __init__(self, config: T2RConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(T2RDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def context(self, h, attention_mask, position_ids, cu_seqlens, past: int) -> AttentionContext:
        B, T = h.shape[:2]
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                    f"(batch, cached + new tokens)"
                )
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is not None and (position_ids.ndim != 2 or position_ids.shape[1] != T
                                         or position_ids.shape[0] not in (1, B)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, T)} (batch, length)")
        doc_ids = None
        if cu_seqlens is not None:
            if past or attention_mask is not None:
                raise ValueError("packed documents (cu_seqlens, cu_seq_lens_q/k, seq_idx or restarting position_ids) "
                                 "cannot be combined with a cache or with padding (an attention_mask with zeros)")
            cu_seqlens = cu_seqlens.to(h.device)
            # one read of the offsets to the host, shared with every GSA layer's kernels (sequence_bounds)
            bounds = sequence_bounds(cu_seqlens)
            if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {list(bounds)}")
            if bounds[-1] != B * T:
                raise ValueError(f"cu_seqlens must end at batch x length = {B * T}, got {bounds[-1]}")
            if not set(range(0, B * T + 1, T)) <= set(bounds):
                raise ValueError(f"cu_seqlens must contain every row boundary (multiples of {T}): "
                                 "a packed document may not continue into the next row")
            doc_ids = _cu_seqlens_to_doc_ids(cu_seqlens, B, T)
        # Each token's index in the sequence the layers see (its document, when packed; its real tokens,
        # when left-padded): what the window hybrid counts with. RoPE takes the caller's position_ids
        # where given (a padding-free collator restarts them per document, as here).
        if doc_ids is not None:
            positions = _doc_positions(doc_ids)
        elif attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        else:
            positions = torch.arange(past, past + T, device=h.device).expand(B, T)
        cos, sin = self.rotary_emb(positions if position_ids is None else position_ids, h.dtype)
        return AttentionContext(cos=cos, sin=sin, key_mask=attention_mask, cu_seqlens=cu_seqlens, doc_ids=doc_ids,
                                positions=positions)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, *, cache=None,
                cu_seqlens=None, output_attentions=None, cache_position=None, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, seq_idx=None,
                transfer_errors: TransferErrors | None = None):
        """The decoder without its LM head: ``last_hidden_state`` (after the final norm), the cache
        (``use_cache``, default: the config's, outside training; never for packed documents) and, with
        ``output_hidden_states``, the embeddings and every layer's output. The arguments are those of
        ``T2RForCausalLM.forward``; an unknown one is refused (TypeError naming it). With
        ``transfer_errors``, attention transfer: every GSA layer passes the teacher's output on and adds
        its error to that collector."""
        _refuse_attention_weights(output_attentions)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _pick_cache(cache, past_key_values)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        cu_seqlens = packed_cu_seqlens(
            B, T, attention_mask=attention_mask, position_ids=position_ids, past=past, cu_seqlens=cu_seqlens,
            cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
            max_length_k=max_length_k, seq_idx=seq_idx)
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        if use_cache and cache is None and cu_seqlens is None:
            cache = T2RCache(self.config.num_hidden_layers)
        if isinstance(cache, T2RStaticCache):
            cache.begin(B, T, attention_mask, h.device)
        ctx = self.context(h, attention_mask, position_ids, cu_seqlens, past)
        ctx.transfer = transfer_errors
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
        out = BaseModelOutputWithPast(last_hidden_state=h, hidden_states=tuple(hidden) if hidden is not None else None,
                                      **{BASE_CACHE_OUTPUT_KEY: cache})
        return out if return_dict is not False else out.to_tuple()


class T2RForCausalLM(T2RPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The loss honours num_items_in_batch (summed over targets, divided by it), so transformers'
    # Trainer passes it and leaves the loss unscaled under gradient accumulation.
    accepts_loss_kwargs = True

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
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states=None, attention_transfer: bool = False,
                return_dict=None, *, num_items_in_batch=None, output_attentions=None,
                cache_position=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                seq_idx=None):
        """Causal LM forward. ``labels`` are shifted inside (-100 ignored). The loss is the mean over
        targets, or with ``num_items_in_batch`` their sum divided by it (what transformers' Trainer
        passes under gradient accumulation).

        Packed documents (no state or attention crosses a boundary; RoPE positions restart in each) come
        as t2r's ``cu_seqlens`` ([N + 1] offsets over the flattened batch), transformers'
        flash-attention kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
        ``max_length_k``, ``seq_idx``, or ``position_ids`` restarting at 0 inside a row (padding-free
        collators); see ``packed_cu_seqlens``. No prediction crosses a boundary either.

        Accepted for transformers' and TRL's sake: ``past_key_values`` (the ``cache``), ``return_dict``
        (False: a tuple), ``output_attentions`` (only False: there are no attention weights),
        ``cache_position`` (ignored: the cache counts its tokens), ``logits_to_keep`` (the last N
        positions, or a tensor of indices). Any other keyword is refused with a TypeError naming it
        (``shift_labels`` too: a parameter named like a label would make Trainer's evaluation expect
        it in every batch).

        ``attention_transfer=True``: every GSA layer is fed the teacher's hidden states and the
        output's ``loss`` is the sum over GSA layers and real tokens of the per-token mean squared
        error between the layer's output and the teacher's softmax attention output (no logits).
        """
        _refuse_attention_weights(output_attentions)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _pick_cache(cache, past_key_values)
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        cu_seqlens = packed_cu_seqlens(
            B, T, attention_mask=attention_mask, position_ids=position_ids, past=past, cu_seqlens=cu_seqlens,
            cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
            max_length_k=max_length_k, seq_idx=seq_idx)
        if attention_transfer:
            return self._attention_transfer(input_ids, attention_mask, position_ids, cu_seqlens)
        if (isinstance(cache, T2RStaticCache) and T == 1 and cache.get_seq_length() > 0 and input_ids is not None
                and labels is None and not output_hidden_states):
            # a decoding step: buffers written in place, on CUDA a graph replay (step_graph.py)
            output = CausalLMOutputWithPast(logits=run_step(self, cache, input_ids), **{CACHE_OUTPUT_KEY: cache})
            return output if return_dict is not False else output.to_tuple()
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if not keep_all and labels is not None:
            raise ValueError("logits_to_keep drops positions that labels need; leave it out when computing a loss")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         cache=cache, cu_seqlens=cu_seqlens)
        h = out.last_hidden_state
        if not keep_all:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, cu_seqlens, num_items_in_batch=num_items_in_batch)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_OUTPUT_KEY: out.get(BASE_CACHE_OUTPUT_KEY)})
        return output if return_dict is not False else output.to_tuple()

    def decode_step(self, input_ids: torch.Tensor, cache: T2RStaticCache) -> torch.Tensor:
        """Logits [B, 1, V] of one new token per row (``input_ids`` [B, 1]) after the tokens the static
        cache holds, which it updates in place. Reads no host value: the body of a CUDA-graphed step
        (``step_graph.py``); ``forward`` runs it for a one-token call on a ``T2RStaticCache``."""
        m = self.model
        h = m.embed_tokens(input_ids)
        pos = cache.step_positions()
        cos, sin = m.rotary_emb(pos, h.dtype)
        ctx = AttentionContext(cos=cos, sin=sin, positions=pos, step=True)
        cache.step_begin()
        for layer in m.layers:
            h = layer(h, ctx, cache)
        cache.step_end()
        return self.lm_head(m.norm(h))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """``generate(..., cache_implementation="static")`` decodes on a ``T2RStaticCache`` for the batch
        (CUDA graphs on CUDA); anything else as transformers does."""
        if (generation_config.cache_implementation == "static" and generation_config.use_cache is not False
                and model_kwargs.get(CACHE_OUTPUT_KEY) is None):
            rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
            model_kwargs[CACHE_OUTPUT_KEY] = T2RStaticCache(self.config, rows, max_cache_length)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                     max_cache_length, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, **kwargs):
        """Feed only the tokens the cache has not seen; positions follow the attention mask so a
        left-padded row decodes like the same prompt alone. ``logits_to_keep`` (generate asks for the
        last position only) and requests for hidden states or attentions pass on to ``forward``."""
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if isinstance(cache, T2RCache) else 0
        inputs = {"cache": cache if isinstance(cache, T2RCache) else None, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        for key in ("output_hidden_states", "output_attentions"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    def _attention_transfer(self, input_ids, attention_mask, position_ids, cu_seqlens):
        collected = TransferErrors()
        checkpointing = self.model.gradient_checkpointing
        # No activation checkpointing here: the trunk keeps no graph (the teacher's hidden states
        # flow on), so it would save nothing, and the errors leave each layer beside its output.
        self.model.gradient_checkpointing = False
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, cu_seqlens=cu_seqlens, transfer_errors=collected)
        finally:
            self.model.gradient_checkpointing = checkpointing
        errors = collected.stacked()  # [layers, B, T]
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
        """Recurrent state of all converted layers for ``batch_size`` sequences, in bytes (fp32); with a
        window, the ring buffer of the last W tokens too (in the weights' dtype)."""
        c = self.config
        per_layer = c.state_floats_per_layer() * 4
        if c.window_size:  # k, v (the teacher's and the mixer's), the write weights s and gates g, valid
            gates = 2 * c.num_slots if c.mixer == "gsa" else c.head_dim + 1
            per_token = c.num_key_value_heads * (4 * c.head_dim + gates) * self.dtype.itemsize + 1
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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens=None, reduction: str = "mean",
                   num_items_in_batch=None):
    """Next-token cross-entropy over the positions that have a target: their mean, their sum
    (``reduction="sum"``), or with ``num_items_in_batch`` their sum divided by it (transformers'
    Trainer counts the targets of the whole accumulated batch, so the micro-batches' losses add up
    to its mean)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    target = next_token_targets(labels, cu_seqlens)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    target = target.reshape(-1).to(flat_logits.device)
    losses = token_cross_entropy(flat_logits, target)  # fp32 math, no fp32 copy of the logits kept
    total = losses.sum()
    if num_items_in_batch is None:
        return total if reduction == "sum" else total / (target != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
