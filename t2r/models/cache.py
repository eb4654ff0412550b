"""T2RCache: what a converted model carries between decoding steps.

GSA layers keep their recurrent state (slot keys [B, H, K, M], slot values [B, H, M, V], fp32),
whose size does not depend on the context length; layers kept as softmax attention keep a
KV cache ([B, T, H, D] keys and values) that grows with it.
"""
from __future__ import annotations

import torch


class T2RCache:
    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
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
        self.layers = [None if e is None else tuple(t.index_select(0, beam_idx.to(t.device)) for t in e)
                       for e in self.layers]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.layers = [None if e is None else tuple(t.repeat_interleave(repeats, 0) for t in e) for e in self.layers]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.layers = [None if e is None else tuple(t[indices] for t in e) for e in self.layers]

    def nbytes(self) -> int:
        """Memory held, in bytes."""
        return sum(t.numel() * t.element_size() for e in self.layers if e is not None for t in e)
