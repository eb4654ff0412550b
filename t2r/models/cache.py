"""T2RCache: what a converted model carries between decoding steps.

Converted layers keep their recurrent state (fp32), whose size does not depend on the context length:
GSA's slot keys [B, H, K, M] and slot values [B, H, M, V], or the gla/linear state, a 1-tuple
([B, H, K, V],); with a window, also a ring buffer of the last W tokens (``window_buffer``: a dict of
[B, W, ...] tensors). Layers kept as softmax attention keep a KV cache ([B, T, H, D] keys and values)
that grows with it.
"""
from __future__ import annotations

import torch


class T2RCache:
    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.windows: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already processed (for every layer alike)."""
        return self.seen_tokens

    def get_max_length(self):
        return None

    def gsa_state(self, layer_idx: int):
        return self.layers[layer_idx]

    def set_gsa_state(self, layer_idx: int, state) -> None:
        self.layers[layer_idx] = tuple(state)

    def window_buffer(self, layer_idx: int):
        return self.windows[layer_idx]

    def set_window_buffer(self, layer_idx: int, buffer: dict) -> None:
        self.windows[layer_idx] = buffer

    def _map_rows(self, fn) -> None:
        """Apply ``fn`` to every cached tensor (batch along dim 0)."""
        self.layers = [None if e is None else tuple(fn(t) for t in e) for e in self.layers]
        self.windows = [None if e is None else {k: fn(t) for k, t in e.items()} for e in self.windows]

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's keys and values [B, T, H, D]; return all of them so far."""
        past = self.layers[layer_idx]
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        self.layers[layer_idx] = (k, v)
        return k, v

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def nbytes(self) -> int:
        """Memory held, in bytes."""
        tensors = [t for e in self.layers if e is not None for t in e]
        tensors += [t for e in self.windows if e is not None for t in e.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
