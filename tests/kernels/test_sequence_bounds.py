"""Packed batches: the kernels read cu_seqlens to the host once per tensor (each read waits for the
GPU), and a tensor changed in place is read again, so a reused offsets tensor never runs on stale
chunk tables."""
import pytest
import torch

from t2r.kernels.gsa import chunk_gsa, naive_recurrent_gsa
from t2r.kernels.gsa.utils import GSAInputError, sequence_bounds
from tests.kernels.gsa_inputs import make_inputs, rel_err
from tests.kernels.triton_interp import DEVICE, triton_interpreter

pytest.importorskip("triton")


def test_offsets_changed_in_place_are_read_again():
    cu = torch.tensor([0, 3, 10])
    assert sequence_bounds(cu) == (0, 3, 10)
    cu[1] = 7
    assert sequence_bounds(cu) == (0, 7, 10)
    assert sequence_bounds(torch.tensor([0, 4, 10])) == (0, 4, 10)  # a new tensor is its own


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_reused_offsets_tensor_gives_the_reference_for_its_new_values(backend):
    """The Triton path builds its chunk tables once per cu_seqlens tensor: editing the tensor in
    place between two calls must rebuild them (else the second call would run the old documents)."""
    inputs = make_inputs(1, 70, 4, 2, K=16, V=16, M=16, seed=3, device=DEVICE)
    cu = torch.tensor([0, 9, 70], device=DEVICE)
    with triton_interpreter(), torch.no_grad():
        chunk_gsa(*inputs, cu_seqlens=cu, backend=backend)
        cu[1] = 41
        o, _ = chunk_gsa(*inputs, cu_seqlens=cu, backend=backend)
    ref, _ = naive_recurrent_gsa(*(x.cpu().double() for x in inputs), cu_seqlens=torch.tensor([0, 41, 70]))
    assert rel_err(o.cpu().double(), ref) < 1e-4


def test_bad_offsets_are_refused_before_and_after_an_in_place_edit():
    inputs = make_inputs(1, 12, 2, 1, seed=1)
    cu = torch.tensor([0, 5, 12])
    chunk_gsa(*inputs, cu_seqlens=cu, backend="torch")
    cu[1] = 13
    with pytest.raises(GSAInputError, match=r"never decrease and end at T=12; got \[0, 13, 12\]"):
        chunk_gsa(*inputs, cu_seqlens=cu, backend="torch")
