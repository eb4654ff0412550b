"""The torch GSA paths (chunked for training, recurrent for decoding) against the fp32/fp64 loop."""
import pytest
import torch

from t2r.kernels.gsa import GSAInputError, chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa
from t2r.kernels.gsa.chunk_torch import chunk_gsa_torch
from tests.kernels.gsa_inputs import make_inputs, rel_err


def _grads(fn, inputs, h0, seed=1):
    """Output, final state and gradients of every input under a random cotangent."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    h0 = tuple(x.detach().clone().requires_grad_() for x in h0) if h0 else None
    o, (hk, hv) = fn(*leaves, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in (o, hk, hv))
    loss.backward()
    grads = [x.grad for x in leaves] + ([x.grad for x in h0] if h0 else [])
    return [o, hk, hv] + grads


NAMES = ["o", "final_k", "final_v", "dq", "dk", "dv", "ds", "dg", "dh0_k", "dh0_v"]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunk_matches_naive_outputs_states_and_grads(T, G):
    *inputs, h0 = make_inputs(2, T, 2 * G, 2, K=8, V=6, M=5, initial_state=True, seed=T + G)
    ref = _grads(naive_recurrent_gsa, [x.double() for x in inputs], tuple(x.double() for x in h0))
    out = _grads(chunk_gsa, inputs, h0)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


@pytest.mark.parametrize("gate", ["near0", "near1"])
def test_extreme_gates_stay_finite_and_exact(gate):
    *inputs, h0 = make_inputs(1, 70, 4, 2, initial_state=True, gate=gate, seed=3)
    ref = _grads(naive_recurrent_gsa, [x.double() for x in inputs], tuple(x.double() for x in h0))
    out = _grads(chunk_gsa, inputs, h0)
    for name, a, b in zip(NAMES, out, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def test_varlen_resets_state_at_each_boundary():
    cu = torch.tensor([0, 1, 1, 40, 57, 130])
    *inputs, h0 = make_inputs(1, 130, 4, 2, initial_state=True, N=5, seed=5)
    ref = _grads(lambda *a, **kw: naive_recurrent_gsa(*a, cu_seqlens=cu, **kw),
                 [x.double() for x in inputs], tuple(x.double() for x in h0))
    out = _grads(lambda *a, **kw: chunk_gsa(*a, cu_seqlens=cu, **kw), inputs, h0)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))
    # Each packed sequence equals the same sequence run alone.
    q, k, v, s, g = inputs
    o_packed, _ = chunk_gsa(q, k, v, s, g, cu_seqlens=cu)
    o_alone, _ = chunk_gsa(*(x[:, 40:57] for x in inputs))
    assert rel_err(o_packed[:, 40:57], o_alone) < 1e-6


def test_gradcheck_float64_tiny():
    inputs = make_inputs(1, 5, 2, 1, K=3, V=2, M=3, dtype=torch.float64, seed=7)
    inputs = [x.requires_grad_() for x in inputs]
    h0 = tuple(torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(1, 1, 3, 3), (1, 1, 3, 2)])

    def fn(q, k, v, s, g, hk, hv):
        o, (fk, fv) = chunk_gsa_torch(q, k, v, s, g, initial_state=(hk, hv), output_final_state=True, chunk_size=2)
        return o, fk, fv

    assert torch.autograd.gradcheck(fn, (*inputs, *h0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_step_continues_a_chunked_prefix(dtype):
    """Decoding token by token from the prefill's final state equals one pass over everything."""
    inputs = make_inputs(3, 41, 8, 2, M=16, K=16, V=16, dtype=dtype, seed=11)
    o_full, f_full = chunk_gsa(*inputs, output_final_state=True)
    o_pre, state = chunk_gsa(*(x[:, :30] for x in inputs), output_final_state=True)
    steps = []
    for t in range(30, 41):
        o_t, state = fused_recurrent_gsa(*(x[:, t:t + 1] for x in inputs), initial_state=state, output_final_state=True)
        steps.append(o_t)
    o_dec = torch.cat([o_pre] + steps, 1)
    assert o_dec.dtype == dtype and state[0].dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(o_dec, o_full) < tol
    assert rel_err(state[0], f_full[0]) < tol and rel_err(state[1], f_full[1]) < tol


def test_bad_inputs_get_clear_errors():
    q, k, v, s, g = make_inputs(2, 8, 4, 2)
    with pytest.raises(GSAInputError, match="multiple of kv heads"):
        chunk_gsa(q[:, :, :3], k, v, s, g)
    with pytest.raises(GSAInputError, match="B=1"):
        chunk_gsa(q, k, v, s, g, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(GSAInputError, match="end at T=8"):
        chunk_gsa(*(x[:1] for x in (q, k, v, s, g)), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(GSAInputError, match="g has shape"):
        chunk_gsa(q, k, v, s[..., :3], g)
    with pytest.raises(GSAInputError, match="initial_state shapes"):
        chunk_gsa(q, k, v, s, g, initial_state=(torch.zeros(2, 2, 8, 6), torch.zeros(2, 2, 8, 6)))
    with pytest.raises(GSAInputError, match="unknown GSA backend"):
        chunk_gsa(q, k, v, s, g, backend="cuda")
