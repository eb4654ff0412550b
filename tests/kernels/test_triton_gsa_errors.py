"""Inputs the GSA Triton kernels cannot take get a clear GSAInputError, never wrong numbers."""
import os

import pytest
import torch

from t2r.kernels.gsa import GSAInputError, chunk_gsa, fused_recurrent_gsa
from tests.kernels.gsa_inputs import make_inputs
from tests.kernels.triton_interp import CUDA, DEVICE, triton_interpreter

pytest.importorskip("triton")


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


@pytest.mark.parametrize("fn", [chunk_gsa, fused_recurrent_gsa])
def test_float64_inputs_are_refused(fn):
    inputs = make_inputs(1, 4, 2, 1, K=16, V=16, M=16, dtype=torch.float64, device=DEVICE)
    with torch.no_grad(), pytest.raises(GSAInputError, match="bfloat16, float16 or float32"):
        fn(*inputs, backend="triton")


@pytest.mark.parametrize("fn", [chunk_gsa, fused_recurrent_gsa])
@pytest.mark.parametrize("dims", [dict(K=192), dict(V=256), dict(M=256)])
def test_dims_over_the_register_tiles_are_refused(fn, dims):
    kw = dict(K=16, V=16, M=16) | dims
    inputs = make_inputs(1, 2, 2, 1, device=DEVICE, **kw)
    with torch.no_grad(), pytest.raises(GSAInputError, match="not supported by the Triton kernels"):
        fn(*inputs, backend="triton")


@pytest.mark.parametrize("fn", [chunk_gsa, fused_recurrent_gsa])
def test_query_heads_not_a_multiple_of_kv_heads(fn):
    q, k, v, s, g = make_inputs(1, 4, 6, 4, K=16, V=16, M=16, device=DEVICE)
    with torch.no_grad(), pytest.raises(GSAInputError, match="multiple of kv heads"):
        fn(q, k, v, s, g, backend="triton")


def test_float64_initial_state_is_refused():
    *inputs, h0 = make_inputs(1, 4, 2, 1, K=16, V=16, M=16, initial_state=True, device=DEVICE)
    with pytest.raises(GSAInputError, match="float32 state"):
        chunk_gsa(*inputs, initial_state=tuple(x.double() for x in h0), backend="triton")


def test_decode_kernel_refuses_to_be_trained_through():
    inputs = [x.requires_grad_() for x in make_inputs(1, 1, 2, 1, K=16, V=16, M=16, device=DEVICE)]
    with pytest.raises(GSAInputError, match="no backward"):
        fused_recurrent_gsa(*inputs, backend="triton")


@pytest.mark.skipif(CUDA, reason="about CPU tensors")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, 4, 2, 1, K=16, V=16, M=16)
    with pytest.raises(GSAInputError, match="TRITON_INTERPRET"):
        chunk_gsa(*inputs, backend="triton")
    assert "TRITON_INTERPRET" not in os.environ
