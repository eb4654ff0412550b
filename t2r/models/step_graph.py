"""One decoding step of a converted model on a ``T2RStaticCache``, replayed as a CUDA graph.

Why ``torch.cuda.CUDAGraph`` and not ``torch.compile(mode="reduce-overhead")``: the step is
already a fixed sequence of kernels on fixed buffers (the GSA state, the ring buffer and the
softmax keys and values are written in place, the counters live on the device), so a graph of
it needs no compiler; capture takes milliseconds where compiling takes tens of seconds per batch
size, it records the Triton decoding kernel as it is, and the eager code that runs on the CPU
is the code that is captured. One graph per (model, batch size), kept by the cache, whose
buffers it reads and writes. A graph replays the model as it was captured: a change to the model
afterwards (weights swapped, ``window_branches``) needs a new cache.
"""
from __future__ import annotations

import warnings

import torch


class StepGraph:
    """``model.decode_step`` on ``cache`` for a batch of ``input_ids`` [B, 1], captured."""

    def __init__(self, model, cache, input_ids: torch.Tensor):
        self.input_ids = input_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records without running; its own memory pool
            self.logits = model.decode_step(self.input_ids, cache)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits.clone()


def uses_graph(cache, input_ids: torch.Tensor) -> bool:
    """CUDA inputs, unless the cache was made with ``cuda_graph=False``."""
    return input_ids.is_cuda and cache.cuda_graph


@torch.no_grad()
def run_step(model, cache, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, 1, V] of one decoding step; the cache moves on by one token. On CUDA (unless the
    cache says ``cuda_graph=False``) the first step of a batch size runs eagerly on a side stream
    (compiling the Triton kernels, setting up cuBLAS) and is then captured; later ones replay it."""
    if input_ids.shape[0] != cache.batch_size:
        raise ValueError(f"the cache holds {cache.batch_size} sequences, got a step for {input_ids.shape[0]}")
    if not uses_graph(cache, input_ids):
        logits = model.decode_step(input_ids, cache)
    else:
        key = (id(model), input_ids.shape[0])
        graph = cache.graphs.get(key)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = model.decode_step(input_ids, cache)
            torch.cuda.current_stream().wait_stream(side)
            try:
                cache.graphs[key] = StepGraph(model, cache, input_ids)
            except RuntimeError as e:  # an operation a graph cannot hold: decode on, eagerly
                cache.cuda_graph = False
                warnings.warn(f"t2r: the decoding step could not be captured as a CUDA graph ({str(e)[:300]}); "
                              "this cache decodes without graphs from here on (slower). Please report it with the "
                              "model's config.json.", RuntimeWarning, stacklevel=2)
        else:
            logits = graph(input_ids)
    cache.seen_tokens += 1
    return logits
