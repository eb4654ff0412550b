"""A packed training step (cu_seqlens) waits for the GPU once, however deep the model: the offsets
are read to the host once and every layer's kernels share that read (forward and the gradient
checkpointing recompute). Each such read stalls the host until the GPU has drained its queue, and
a launch-bound step (SmolLM2's) loses the overlap between host and GPU with every one."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import converted
from tests.kernels.triton_interp import triton_interpreter

pytest.importorskip("triton")


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (int(), bool(), item())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero", "item"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_in_a_packed_step(layers: int, monkeypatch) -> int:
    _, model, _ = converted(family="llama", teacher_overrides={"num_hidden_layers": layers})
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "triton"  # the kernels' own host code (chunk tables), through the interpreter
    model.train()
    model.gradient_checkpointing_enable()
    lists = collections.Counter()
    tolist = torch.Tensor.tolist

    def counted(self):
        lists["n"] += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    ids = torch.randint(2, 200, (2, 16))
    cu = torch.tensor([0, 5, 16, 20, 32])
    with triton_interpreter(), HostReads() as reads:
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
    monkeypatch.undo()
    return reads.count + lists["n"]


def test_a_packed_step_reads_the_offsets_once_whatever_the_depth(monkeypatch):
    shallow, deep = reads_in_a_packed_step(2, monkeypatch), reads_in_a_packed_step(4, monkeypatch)
    assert shallow == deep == 1, (shallow, deep)
