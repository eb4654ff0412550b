"""The gated linear attention operator (GLA and plain linear attention) against the fp64 loop:
outputs, final states and every gradient, on odd lengths, GQA, packed varlen rows and extreme gates."""
import pytest
import torch
import torch.nn.functional as F

from t2r.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla
from t2r.kernels.gsa import GSAInputError
from tests.kernels.gsa_inputs import rel_err


def make_gla_inputs(B, T, HQ, H, K=8, V=6, gate="normal", N=None, seed=0):
    """q, k, v, g and an fp32 initial state [N, H, K, V]. gate: 'normal' (GLA-like, a ~ 0.9),
    'near0' (a ~ 1e-13: forgets at once), 'near1' (a ~ 1 - 1e-6), 'none' (g = 0: no decay),
    'head' (one constant per head, RetNet's decays)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(B, T, HQ, K), rnd(B, T, H, K), rnd(B, T, H, V)
    logits = rnd(B, T, H, K)
    g = {"normal": lambda: F.logsigmoid(logits) / 8, "near0": lambda: -30.0 + 0.1 * logits.tanh(),
         "near1": lambda: -1e-6 * torch.sigmoid(logits), "none": lambda: torch.zeros_like(logits),
         "head": lambda: torch.log1p(-2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))[:, None]
         .expand(B, T, H, K)}[gate]()
    h0 = rnd(B if N is None else N, H, K, V)
    return [x.float() for x in (q, k, v, g)], h0.float()


def _grads(fn, inputs, h0, seed=1):
    """Output, final state and the gradients of every input and of the initial state."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    h0 = h0.detach().clone().requires_grad_()
    o, S = fn(*leaves, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device) for t in (o, S)]
    loss = sum((t.double() * w).sum() for t, w in zip((o, S), weights))
    loss.backward()
    return [o, S] + [x.grad for x in leaves] + [h0.grad]


NAMES = ["o", "final", "dq", "dk", "dv", "dg", "dh0"]


def _compare(fn, inputs, h0, tol=1e-4, ref_fn=naive_recurrent_gla):
    ref = _grads(ref_fn, [x.double() for x in inputs], h0.double())
    out = _grads(fn, inputs, h0)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))  # rel_err is inf on NaN or inf


@pytest.mark.parametrize("T", [1, 15, 16, 17, 45])
@pytest.mark.parametrize("G", [1, 3])
def test_chunk_matches_naive(T, G):
    inputs, h0 = make_gla_inputs(2, T, 2 * G, 2, seed=T + G)
    _compare(chunk_gla, inputs, h0)


@pytest.mark.parametrize("gate", ["near0", "near1", "none", "head"])
def test_extreme_and_fixed_gates(gate):
    inputs, h0 = make_gla_inputs(1, 37, 4, 2, gate=gate, seed=3)
    _compare(chunk_gla, inputs, h0)


def test_varlen_resets_state_at_each_boundary():
    cu = torch.tensor([0, 1, 1, 20, 37, 53])
    inputs, h0 = make_gla_inputs(1, 53, 4, 2, N=5, seed=5)
    _compare(lambda *a, **kw: chunk_gla(*a, cu_seqlens=cu, **kw), inputs, h0,
             ref_fn=lambda *a, **kw: naive_recurrent_gla(*a, cu_seqlens=cu, **kw))
    o_packed, _ = chunk_gla(*inputs, cu_seqlens=cu)
    o_alone, _ = chunk_gla(*(x[:, 20:37] for x in inputs))
    assert rel_err(o_packed[:, 20:37], o_alone) < 1e-6


def test_recurrent_decoding_continues_the_chunked_state():
    """Prefill with the chunked path, then decode token by token: the outputs of one pass."""
    inputs, h0 = make_gla_inputs(2, 24, 4, 2, seed=7)
    o_all, S_all = chunk_gla(*inputs, initial_state=h0, output_final_state=True)
    o_pre, S = chunk_gla(*(x[:, :19] for x in inputs), initial_state=h0, output_final_state=True)
    steps = []
    for t in range(19, 24):
        o_t, S = fused_recurrent_gla(*(x[:, t:t + 1] for x in inputs), initial_state=S, output_final_state=True)
        steps.append(o_t)
    assert rel_err(torch.cat([o_pre, *steps], 1), o_all) < 1e-5
    assert rel_err(S, S_all) < 1e-5


def test_bad_state_shape_says_what_is_expected():
    inputs, h0 = make_gla_inputs(1, 5, 2, 2)
    with pytest.raises(GSAInputError, match=r"initial_state must be one state \[N, H, K, V\]"):
        chunk_gla(*inputs, initial_state=(h0, h0))
