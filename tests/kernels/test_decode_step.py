"""gsa_decode_step (the fused decoding step: gate logits, feature maps, recurrence, output norm)
against an fp64 composition of the formulas: outputs and final states, on the Triton kernel (the
interpreter on CPU) and the torch path, with GQA, odd dims, extreme and skipped gates, in place."""
import pytest
import torch
import torch.nn.functional as F

from t2r.kernels.gsa import GSAInputError
from t2r.kernels.gsa.decode_step import ACTIVATIONS, gsa_decode_step
from t2r.kernels.gsa.naive import recurrent_gsa_loop
from tests.kernels.gsa_inputs import rel_err
from tests.kernels.triton_interp import DEVICE, poisoned_outputs, triton_interpreter


def _inputs(B=3, T=2, HQ=4, H=2, K=24, V=40, M=10, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rnd(B, T, HQ, K), rnd(B, T, H, K), rnd(B, T, H, V)
    x = rnd(B, T, H, M) * 4
    x[0, 0, 0, :3] = float("inf")  # a skipped token's slots: no write, no decay
    x[1, -1, 1, :2] = 40.0  # gates at 1 - 1e-18: g and s below fp32's resolution of 1 - exp(g)
    x[2, 0, 0, :2] = -40.0  # forgets at once
    state = (rnd(B, H, K, M), rnd(B, H, M, V))
    w = torch.rand(V, generator=gen) + 0.5
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return [move(t.to(dtype)) for t in (q, k, v)] + [move(x)], tuple(map(move, state)), move(w)


def _reference(q, k, v, x, state, tau, qk_act, v_act, w, eps=1e-6):
    """The layer's formulas in fp64: g = logsigmoid(x) / tau, s = 1 - exp(g), maps, operator, norm."""
    d = torch.float64
    g = F.logsigmoid(x.to(d)) / tau
    s = -torch.expm1(g)
    act = ACTIVATIONS
    o, final = recurrent_gsa_loop(act[qk_act](q.to(d)), act[qk_act](k.to(d)), act[v_act](v.to(d)), s, g, None,
                                  tuple(t.to(d) for t in state), True, dtype=d)
    if w is not None:
        a = F.silu(o)
        o = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * w.to(d)
    return o, final


@pytest.mark.parametrize("qk_act", ["identity", "swish", "relu", "elu1"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_step_matches_the_fp64_formulas(qk_act, norm, backend):
    (q, k, v, x), state, w = _inputs()
    w = w if norm else None
    ref, ref_final = _reference(q, k, v, x, state, 8.0, qk_act, "silu", w)
    with triton_interpreter(), poisoned_outputs():
        o, final = gsa_decode_step(q, k, v, x, state, tau=8.0, qk_act=qk_act, v_act="silu", norm_weight=w,
                                   backend=backend)
    assert o.dtype == q.dtype and o.shape == ref.shape
    assert rel_err(o, ref) < 1e-5
    for got, want in zip(final, ref_final):
        assert rel_err(got, want) < 1e-5
    assert torch.isfinite(o).all()  # +inf logits (skipped slots) make no NaN


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_step_updates_a_state_in_place_and_reads_it_first(backend):
    (q, k, v, x), state, w = _inputs(T=1, HQ=6, H=3, K=16, V=16, M=16)
    ref, ref_final = _reference(q, k, v, x, state, 4.0, "swish", "identity", w)
    buf = tuple(t.clone() for t in state)
    with triton_interpreter():
        o, final = gsa_decode_step(q, k, v, x, buf, tau=4.0, qk_act="swish", v_act="identity", norm_weight=w,
                                   out_state=buf, backend=backend)
    assert all(a is b for a, b in zip(final, buf))
    assert rel_err(o, ref) < 1e-5
    for got, want in zip(buf, ref_final):
        assert rel_err(got, want) < 1e-5


def test_decode_step_in_bf16_stays_close_to_fp64():
    (q, k, v, x), state, w = _inputs(T=1, dtype=torch.bfloat16)
    ref, ref_final = _reference(q, k, v, x, state, 8.0, "swish", "silu", w)
    with triton_interpreter():
        o, final = gsa_decode_step(q, k, v, x, state, tau=8.0, qk_act="swish", v_act="silu", norm_weight=w,
                                   backend="triton")
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ref) < 1e-2  # one rounding of the output to bf16
    for got, want in zip(final, ref_final):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


def test_decode_step_starts_from_zeros_without_a_state():
    (q, k, v, x), state, w = _inputs()
    zeros = tuple(torch.zeros_like(t) for t in state)
    ref, ref_final = _reference(q, k, v, x, zeros, 8.0, "identity", "identity", None)
    with triton_interpreter(), poisoned_outputs():
        o, final = gsa_decode_step(q, k, v, x, None, tau=8.0, backend="triton")
    assert rel_err(o, ref) < 1e-5 and rel_err(final[1], ref_final[1]) < 1e-5


def test_decode_step_refuses_bad_arguments():
    (q, k, v, x), state, w = _inputs()
    with pytest.raises(GSAInputError, match="qk_act"):
        gsa_decode_step(q, k, v, x, state, tau=8.0, qk_act="gelu")
    with pytest.raises(GSAInputError, match="norm_weight"):
        gsa_decode_step(q, k, v, x, state, tau=8.0, norm_weight=w[:-1])
    with pytest.raises(GSAInputError, match="out_state"):
        gsa_decode_step(q, k, v, x, state, tau=8.0, out_state=(state[0].double(), state[1]))
    with pytest.raises(GSAInputError, match="tau"):
        gsa_decode_step(q, k, v, x, state, tau=0.0)
    with pytest.raises(GSAInputError, match="gate_logits must be"):
        gsa_decode_step(q, k, v, x[:, :, :1], state, tau=8.0)
    with pytest.raises(GSAInputError, match="initial_state shapes"):  # 9 slots of logits, a state of 10
        gsa_decode_step(q, k, v, x[..., :-1], state, tau=8.0)
