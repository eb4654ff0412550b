"""T2RStaticCache: a decoding cache whose every buffer is allocated once, for a maximum batch.

What a converted model carries between steps (``cache.py``) held in fixed tensors that decoding
writes in place, so that one decoding step touches the same memory every time and can be
captured as a CUDA graph (``step_graph.py``):

- per GSA layer, the recurrent state: slot keys [B, H, K, M] and slot values [B, H, M, V], fp32;
- per windowed GSA layer, a ring buffer of the last W tokens (the entries of ``T2RCache``'s
  window buffer; the token of column c sits at slot c mod W);
- per softmax layer of a hybrid, keys and values [B, max_length, H, D], and one [B, max_length]
  mask of the real (not padding) columns for all of them;
- the step counters on the device: ``step_index`` (columns seen, padding included, the same for
  every row) and ``positions`` [B] (real tokens seen per row: the position of the next one).

Buffers are allocated at the first prefill (their per-row shapes are those the layers produce)
and never again; ``max_batch_size`` rows, of which a call uses the first ``batch_size``. Prefill
(several tokens) runs the layers' parallel path through the ``T2RCache`` methods, which here
copy into the buffers; a one-token forward on a cache that has seen tokens is a decoding step
(``AttentionContext.step``): the layers read the counters and write their slot in place, with
no host synchronisation. Only softmax layers need ``max_length``; a model of GSA layers alone
decodes without bound.
"""
from __future__ import annotations

import torch

from .cache import T2RCache


class T2RStaticCache(T2RCache):
    """Decoding state for up to ``max_batch_size`` sequences of at most ``max_length`` tokens (needed only
    with softmax layers); ``cuda_graph=False`` runs the steps eagerly on CUDA too. Reusable: a forward
    on an empty cache (after ``reset()``) starts new sequences in the same buffers and graphs."""

    is_compileable = False  # a step is captured by step_graph.py, not by torch.compile

    def __init__(self, config, max_batch_size: int, max_length: int | None = None, cuda_graph: bool = True):
        super().__init__(config.num_hidden_layers)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        softmax = [i for i in range(config.num_hidden_layers) if i not in config.gsa_layers]
        if softmax and not max_length:
            raise ValueError(f"layers {softmax} keep softmax attention: give the static cache a max_length "
                             "(prompt + new tokens) for their keys and values")
        self.max_batch_size = max_batch_size
        self.max_length = max_length if softmax else None  # GSA layers alone: no bound
        self.cuda_graph = cuda_graph  # steps on CUDA replay a captured graph (False: eager)
        self.window_size = config.window_size
        self.is_linear = [i in config.gsa_layers for i in range(config.num_hidden_layers)]
        self.batch_size = 0
        self._pending = 0  # tokens of the forward under way (prefill)
        self.graphs: dict = {}  # (model id, batch size) -> StepGraph
        self.key_valid: torch.Tensor | None = None
        self.step_index: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    # -- allocation -----------------------------------------------------------------------------
    def _full(self, like: torch.Tensor, rows: int | None = None, dtype=None) -> torch.Tensor:
        """A zero buffer of ``max_batch_size`` rows shaped like ``like`` [B, ...] past its first
        dim (``rows`` replaces its second)."""
        shape = list(like.shape)
        shape[0] = self.max_batch_size
        if rows is not None:
            shape[1] = rows
        return torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[:self.batch_size]

    def begin(self, batch_size: int, num_tokens: int, attention_mask: torch.Tensor | None, device) -> None:
        """Called by the model before a forward of ``num_tokens`` tokens that is not a decoding step:
        checks the batch and the room left, records which columns are real and each row's count."""
        if self.seen_tokens == 0:
            if batch_size > self.max_batch_size:
                raise ValueError(f"batch of {batch_size} sequences, but this static cache holds at most "
                                 f"{self.max_batch_size}; make one with max_batch_size >= {batch_size}")
            self.batch_size = batch_size
            self.reset()
            if self.step_index is None:
                self.step_index = torch.zeros(1, dtype=torch.long, device=device)
                self.positions = torch.zeros(self.max_batch_size, dtype=torch.long, device=device)
        elif batch_size != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, got a batch of {batch_size}")
        end = self.seen_tokens + num_tokens
        if self.max_length and end > self.max_length:
            raise ValueError(f"{end} tokens, but this static cache holds at most max_length={self.max_length} "
                             "(softmax layers keep every key); make one with a larger max_length")
        new = attention_mask[:, -num_tokens:].bool() if attention_mask is not None else None
        if self.max_length:
            if self.key_valid is None:
                self.key_valid = torch.zeros(self.max_batch_size, self.max_length, dtype=torch.bool, device=device)
            self.key_valid[:batch_size, self.seen_tokens:end] = True if new is None else new
        self._rows(self.positions).add_(num_tokens if new is None else new.sum(-1))
        self._pending = num_tokens

    def reset(self) -> None:
        """Empty every row (buffers kept): the next forward starts new sequences."""
        for e in self.layers:
            for t in e or ():
                t.zero_()
        for e in self.windows:
            for t in (e or {}).values():
                t.zero_()
        for t in (self.key_valid, self.step_index, self.positions):
            if t is not None:
                t.zero_()
        self.seen_tokens = 0

    def get_max_length(self):
        return self.max_length

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens
        self.step_index.fill_(self.seen_tokens)
        self._pending = 0

    # -- the T2RCache methods the layers call at prefill ------------------------------------------
    def gsa_state(self, layer_idx: int):
        e = self.layers[layer_idx]
        return None if e is None or self.seen_tokens == 0 else tuple(self._rows(t) for t in e)

    def set_gsa_state(self, layer_idx: int, state) -> None:
        if self.layers[layer_idx] is None:
            self.layers[layer_idx] = tuple(self._full(t) for t in state)
        for buf, t in zip(self.layers[layer_idx], state):
            if self._rows(buf).data_ptr() != t.data_ptr():
                self._rows(buf).copy_(t)

    def window_buffer(self, layer_idx: int):
        """The last W tokens, oldest first (as ``T2RCache`` keeps them)."""
        e = self.windows[layer_idx]
        if e is None or self.seen_tokens == 0:
            return None
        shift = -(self.seen_tokens % self.window_size)
        return {n: torch.roll(self._rows(t), shift, 1) for n, t in e.items()}

    def set_window_buffer(self, layer_idx: int, buffer: dict) -> None:
        if self.windows[layer_idx] is None:
            self.windows[layer_idx] = {n: self._full(t) for n, t in buffer.items()}
        shift = (self.seen_tokens + self._pending) % self.window_size
        for n, t in buffer.items():
            self._rows(self.windows[layer_idx][n]).copy_(torch.roll(t, shift, 1))

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.layers[layer_idx] is None:
            self.layers[layer_idx] = (self._full(k, self.max_length), self._full(v, self.max_length))
        start, end = self.seen_tokens, self.seen_tokens + k.shape[1]
        kb, vb = (self._rows(t) for t in self.layers[layer_idx])
        kb[:, start:end], vb[:, start:end] = k, v
        return kb[:, :end], vb[:, :end]

    # -- what a decoding step reads and writes --------------------------------------------------
    def step_positions(self) -> torch.Tensor:
        """[B, 1] position of this step's token in each row."""
        return self._rows(self.positions)[:, None]

    def step_begin(self) -> None:
        """Mark this step's column real (for the softmax layers)."""
        if self.key_valid is not None:
            self._rows(self.key_valid).index_fill_(1, self.step_index, True)

    def step_end(self) -> None:
        """Advance the device counters (the host's count moves outside a captured step)."""
        self.step_index.add_(1)
        self._rows(self.positions).add_(1)

    def ring(self, layer_idx: int) -> dict[str, torch.Tensor]:
        return {n: self._rows(t) for n, t in self.windows[layer_idx].items()}

    def kv_buffers(self, layer_idx: int):
        """(keys, values [B, max_length, H, D], real columns [B, max_length])."""
        k, v = self.layers[layer_idx]
        return self._rows(k), self._rows(v), self._rows(self.key_valid)

    # -- batch edits (beam search, contrastive search ...): in place ------------------------------
    def _map_rows(self, fn) -> None:
        rows = None
        for t in [t for e in self.layers if e for t in e] + [t for e in self.windows if e for t in e.values()] \
                + [t for t in (self.key_valid, self.positions) if t is not None]:
            new = fn(self._rows(t))
            if new.shape[0] > self.max_batch_size:
                raise ValueError(f"{new.shape[0]} sequences, but this static cache holds at most "
                                 f"{self.max_batch_size}")
            t[:new.shape[0]].copy_(new)
            rows = new.shape[0]
        if rows is not None:
            self.batch_size = rows

    def nbytes(self) -> int:
        tensors = [t for e in self.layers if e for t in e] + [t for e in self.windows if e for t in e.values()]
        tensors += [t for t in (self.key_valid, self.step_index, self.positions) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
