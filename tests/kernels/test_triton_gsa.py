"""The GSA Triton kernels against the fp64 torch reference.

On CPU (CI) the kernels run in the Triton interpreter at small shapes; on a CUDA machine the same
tests compile them, and the `real_shapes` tests run Mistral-7B attention shapes. Every output,
final state and gradient (q, k, v, s, g and both initial states, with cotangents on the final
states too) is compared by ||out - ref|| / ||ref||: < 1e-4 for fp32 inputs, < 1e-2 for bf16/fp16.
Outputs are allocated NaN-poisoned, so an element a kernel leaves unwritten fails.
"""
import pytest
import torch

from t2r.kernels.gsa import chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa
from t2r.kernels.gsa.chunk_torch import chunk_gsa_torch
from t2r.kernels.gsa.utils import BLOCKED, FACTORED, PAIRWISE, chunk_regimes
from tests.kernels.gsa_inputs import make_inputs, rel_err
from tests.kernels.triton_interp import CUDA, DEVICE, poisoned_outputs, triton_interpreter

pytest.importorskip("triton")

NAMES = ["o", "final_k", "final_v", "dq", "dk", "dv", "ds", "dg", "dh0_k", "dh0_v"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def run_with_grads(fn, inputs, h0, cotangent_seed=1, poison=False, **kwargs):
    """[o, final_k, final_v, dq, dk, dv, ds, dg, (dh0_k, dh0_v)] under random cotangents on o and
    on both final states."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    h0 = tuple(x.detach().clone().requires_grad_() for x in h0) if h0 is not None else None
    gen = torch.Generator().manual_seed(cotangent_seed)
    with poisoned_outputs() if poison else torch.enable_grad():
        o, (hk, hv) = fn(*leaves, initial_state=h0, output_final_state=True, **kwargs)
        loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
                   for t in (o, hk, hv))
        loss.backward()
    grads = [x.grad for x in leaves] + ([x.grad for x in h0] if h0 is not None else [])
    return [o, hk, hv] + grads


def triton_chunk(*args, **kwargs):
    return chunk_gsa(*args, backend="triton", **kwargs)


def reference(inputs, h0, fn=chunk_gsa_torch, **kwargs):
    return run_with_grads(fn, [x.detach().double() for x in inputs],
                          None if h0 is None else tuple(x.detach().double() for x in h0), **kwargs)


def assert_close(out, ref, tol, names=NAMES):
    for name, a, b in zip(names, out, ref):
        assert a is not None, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf (unwritten or overflowed)"
        err = rel_err(a.cpu(), b.cpu())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_chunk_outputs_states_and_grads(T, G, dtype):
    *inputs, h0 = make_inputs(2, T, 2 * G, 2, K=16, V=32, M=16, dtype=dtype, initial_state=True,
                              seed=7 * T + G, device=DEVICE)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    assert all(x.dtype == dtype for x in out[3:8])
    assert_close(out, reference(inputs, h0), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["near0", "near1", "mixed"])
def test_chunk_extreme_gates(gate, dtype):
    """Forget gates near 0 (g ~ -30 per step: cumulative decays of e^-2000 inside a chunk) must
    neither overflow nor lose dg's relative accuracy; near 1 nothing decays."""
    base = "near0" if gate == "mixed" else gate
    *inputs, h0 = make_inputs(1, 130, 4, 2, K=16, V=16, M=16, dtype=dtype, gate=base, initial_state=True,
                              seed=3, device=DEVICE)
    if gate == "mixed":  # half of the slots forget at once, half are ordinary
        normal = make_inputs(1, 130, 4, 2, K=16, V=16, M=16, dtype=dtype, seed=4, device=DEVICE)
        inputs[4] = torch.cat([inputs[4][..., :8], normal[4][..., 8:]], -1)
        inputs[3] = torch.cat([inputs[3][..., :8], normal[3][..., 8:]], -1)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert_close(out, reference(inputs, h0), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_strong_gates_take_the_factored_form_and_stay_exact(dtype):
    """g ~ -1 per step (converted models' fast-forgetting slots): each chunk decays by ~e^-64, past
    THRESH from its start but within it on both sides of its middle, where the factored form is taken."""
    *inputs, h0 = make_inputs(1, 130, 4, 2, K=16, V=16, M=16, dtype=dtype, gate="strong", initial_state=True,
                              seed=6, device=DEVICE)
    b = inputs[4].double().cpu()[:, :128].reshape(1, 2, 64, 2, 16).cumsum(2)
    assert (b.abs().amax(dim=(2, 4)) > 40).all()  # from the chunk start: past THRESH
    assert (chunk_regimes(inputs[4].cpu()) == FACTORED).all()  # from the middle: within it
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert_close(out, reference(inputs, h0), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_steep_gates_take_the_blocked_form_and_stay_exact(dtype):
    """g ~ -4 per step: each chunk decays by ~e^-256, past THRESH from its middle, but every sub-block of
    16 rows stays within it from the sub-block's middle, where the blocked form is taken."""
    *inputs, h0 = make_inputs(1, 130, 4, 2, K=16, V=16, M=16, dtype=dtype, gate="steep", initial_state=True,
                              seed=8, device=DEVICE)
    assert (chunk_regimes(inputs[4].cpu())[:, :2] == BLOCKED).all()
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert_close(out, reference(inputs, h0), TOL[dtype])


def three_regimes(K, V, dtype, seed):
    """Inputs [1, 200] with kv head 0 factored except its third chunk (pairwise: g ~ -30) and kv head 1
    blocked (g ~ -4), slots of different gates mixed inside the blocks."""
    *inputs, h0 = make_inputs(1, 200, 4, 2, K=K, V=V, M=16, dtype=dtype, initial_state=True, seed=seed,
                              device=DEVICE)
    steep = make_inputs(1, 200, 4, 2, K=K, V=V, M=16, dtype=dtype, gate="steep", seed=seed + 1, device=DEVICE)
    near0 = make_inputs(1, 200, 4, 2, K=K, V=V, M=16, dtype=dtype, gate="near0", seed=seed + 2, device=DEVICE)
    for i in (3, 4):  # s and g
        inputs[i][:, :, 1, 8:] = steep[i][:, :, 1, 8:]
        inputs[i][:, 128:192, 0, :4] = near0[i][:, 128:192, 0, :4]
    assert chunk_regimes(inputs[4].cpu()).tolist() == [[[FACTORED, BLOCKED], [FACTORED, BLOCKED],
                                                        [PAIRWISE, BLOCKED], [FACTORED, FACTORED]]]
    return inputs, h0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_all_three_gate_regimes_in_one_call(dtype):
    inputs, h0 = three_regimes(16, 16, dtype, seed=30)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert_close(out, reference(inputs, h0), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_varlen_with_empty_and_single_token_sequences(dtype):
    cu = torch.tensor([0, 1, 1, 40, 57, 121, 185, 186], device=DEVICE)
    *inputs, h0 = make_inputs(1, 186, 4, 2, K=16, V=16, M=16, dtype=dtype, initial_state=True, N=7, seed=5,
                              device=DEVICE)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True, cu_seqlens=cu)
    assert_close(out, reference(inputs, h0, cu_seqlens=cu.cpu()), TOL[dtype])
    # a packed sequence gives what it gives alone
    with torch.no_grad():
        o_packed, _ = triton_chunk(*inputs, cu_seqlens=cu)
        o_alone, _ = triton_chunk(*(x[:, 57:121] for x in inputs))
    assert rel_err(o_packed[:, 57:121], o_alone) < 1e-6


def test_chunk_without_states_odd_dims_large_scale_noncontiguous():
    """No initial state and no final state; K, V, M not powers of two; scale 4; inputs that are
    slices of larger tensors (made contiguous inside)."""
    q, k, v, s, g = make_inputs(2, 70, 6, 3, K=20, V=12, M=10, seed=9, device=DEVICE)
    q = torch.cat([q, q], -1)[..., ::2]  # non-contiguous view with the same values
    assert not q.is_contiguous()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s, g)]
    with poisoned_outputs():
        o, final = triton_chunk(*leaves, scale=4.0)
        cot = torch.randn_like(o)
        (o * cot).sum().backward()
    assert final is None
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, s, g)]
    ro, _ = chunk_gsa_torch(*refs, scale=4.0)
    (ro * cot.double()).sum().backward()
    assert_close([o] + [x.grad for x in leaves], [ro] + [x.grad for x in refs], 1e-4,
                 names=["o", "dq", "dk", "dv", "ds", "dg"])


def test_chunk_fp16_inputs():
    *inputs, h0 = make_inputs(1, 65, 4, 2, K=16, V=16, M=16, dtype=torch.float16, initial_state=True, seed=13,
                              device=DEVICE)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    assert out[0].dtype == torch.float16
    assert_close(out, reference(inputs, h0), TOL[torch.float16])


# ------------------------------------------------------------- other kernel configurations

CONFIGS = {
    # tiles narrower than K and V (partial sums over several tiles), one head loop for both gate regimes
    "tile16_nospec": {"tile": 16, "spec": False},
    # the GPU default for 16-bit inputs: state snapshots and their gradients in the input dtype
    # (written by the scans), p in fp16, dY fp32 (on CPU "auto" keeps everything fp32)
    "store_probs": {"store": "probs"},
}


@pytest.fixture
def kernel_config(request):
    from t2r.kernels.gsa import _triton_chunk

    old = dict(_triton_chunk.CONFIG)
    _triton_chunk.CONFIG.update(CONFIGS[request.param])
    yield request.param
    _triton_chunk.CONFIG.clear()
    _triton_chunk.CONFIG.update(old)


@pytest.mark.parametrize("kernel_config", list(CONFIGS), indirect=True)
@pytest.mark.parametrize("case", ["T200_bf16", "mixed_gates_fp32", "three_regimes_fp32"])
def test_chunk_kernel_configs(kernel_config, case):
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    if case.startswith("three"):
        inputs, h0 = three_regimes(40, 24, dtype, seed=40)
    elif case.startswith("mixed"):
        *inputs, h0 = make_inputs(1, 130, 4, 2, K=40, V=24, M=16, dtype=dtype, gate="near0", initial_state=True,
                                  seed=3, device=DEVICE)
        normal = make_inputs(1, 130, 4, 2, K=40, V=24, M=16, dtype=dtype, seed=4, device=DEVICE)
        inputs[3] = torch.cat([inputs[3][..., :8], normal[3][..., 8:]], -1)
        inputs[4] = torch.cat([inputs[4][..., :8], normal[4][..., 8:]], -1)
    else:
        *inputs, h0 = make_inputs(2, 200, 4, 2, K=40, V=24, M=16, dtype=dtype, initial_state=True, seed=11,
                                  device=DEVICE)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True)
    tol = TOL[dtype]
    if kernel_config == "store_probs" and dtype == torch.bfloat16:
        # The interpreter multiplies fp32 operands, so here 16-bit storage is the only rounding and
        # dq's error roughly triples (3.6e-3 -> 9.8e-3). On the GPU, whose tensor cores take these
        # tiles in bf16 anyway, the same storage left the worst gradient error at 6.0e-3
        # (docs/benchmarks.md, run 4 and its store="fp32" row).
        tol = 1.5e-2
    assert_close(out, reference(inputs, h0), tol)


def test_chunk_state_scan_in_blocks(monkeypatch):
    """The state scans take several chunks per step through an associative scan on the GPU; on CPU
    one chunk per step unless told otherwise. Several chunks per step here, with partial blocks,
    varlen sequences (empty, one token, several chunks) and a state and its gradient carried in."""
    from t2r.kernels.gsa import _triton_chunk_state

    monkeypatch.setattr(_triton_chunk_state, "SCAN_NB_CPU", 2)
    monkeypatch.setattr(_triton_chunk_state, "SCAN_BE_CPU", 128)
    cu = torch.tensor([0, 1, 1, 40, 57, 250, 251], device=DEVICE)
    *inputs, h0 = make_inputs(1, 251, 4, 2, K=16, V=16, M=16, initial_state=True, N=6, seed=23, device=DEVICE)
    out = run_with_grads(triton_chunk, inputs, h0, poison=True, cu_seqlens=cu)
    assert_close(out, reference(inputs, h0, cu_seqlens=cu.cpu()), 1e-4)


# ----------------------------------------------------------------------------------- decoding

def triton_step(*args, **kwargs):
    with torch.no_grad():
        return fused_recurrent_gsa(*args, backend="triton", **kwargs)


@pytest.mark.parametrize("M", [16, 32, 64, 128])
@pytest.mark.parametrize("KV", [(8, 12), (64, 64), (128, 128)])
def test_decode_step_matches_reference(M, KV):
    K, V = KV
    *inputs, h0 = make_inputs(3, 1, 8, 2, K=K, V=V, M=M, initial_state=True, seed=M + K, device=DEVICE)
    with poisoned_outputs():
        o, (hk, hv) = triton_step(*inputs, initial_state=h0, output_final_state=True)
    ro, (rk, rv) = naive_recurrent_gsa(*(x.double() for x in inputs), initial_state=tuple(x.double() for x in h0),
                                       output_final_state=True)
    assert_close([o, hk, hv], [ro, rk, rv], 1e-4, names=["o", "final_k", "final_v"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4])
def test_decode_few_tokens_no_initial_state_no_final_state(G, dtype):
    inputs = make_inputs(2, 3, 2 * G, 2, K=16, V=16, M=16, dtype=dtype, seed=G, device=DEVICE)
    with poisoned_outputs():
        o, final = triton_step(*inputs)
    assert final is None and o.dtype == dtype
    ro, _ = naive_recurrent_gsa(*(x.double() for x in inputs))
    assert_close([o], [ro], TOL[dtype], names=["o"])


def test_decode_varlen_with_empty_sequence():
    cu = torch.tensor([0, 1, 1, 4, 5], device=DEVICE)
    *inputs, h0 = make_inputs(1, 5, 4, 2, K=16, V=16, M=32, initial_state=True, N=4, seed=21, device=DEVICE)
    with poisoned_outputs():
        o, (hk, hv) = triton_step(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ro, (rk, rv) = naive_recurrent_gsa(*(x.double() for x in inputs), initial_state=tuple(x.double() for x in h0),
                                       output_final_state=True, cu_seqlens=cu.cpu())
    assert_close([o, hk, hv], [ro, rk, rv], 1e-4, names=["o", "final_k", "final_v"])
    assert torch.equal(hk[1], h0[0][1]) and torch.equal(hv[1], h0[1][1])  # empty sequence keeps its state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_continues_a_triton_prefill(dtype):
    inputs = make_inputs(2, 75, 8, 2, K=16, V=16, M=16, dtype=dtype, seed=17, device=DEVICE)
    with torch.no_grad():
        o_full, f_full = triton_chunk(*inputs, output_final_state=True)
        o_pre, state = triton_chunk(*(x[:, :66] for x in inputs), output_final_state=True)
    steps = []
    for t in range(66, 75):
        o_t, state = triton_step(*(x[:, t:t + 1] for x in inputs), initial_state=state, output_final_state=True)
        steps.append(o_t)
    o_dec = torch.cat([o_pre] + steps, 1)
    assert_close([o_dec, *state], [o_full, *f_full], TOL[dtype], names=["o", "final_k", "final_v"])


# ------------------------------------------------------------------------ real shapes, GPU only

@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("varlen,gate", [(False, "normal"), (True, "normal"), (False, "mixed")])
def test_real_shapes_mistral_chunk(varlen, gate):
    """Mistral-7B attention: 32 query heads, 8 kv heads, head dim 128, 64 slots, bf16; 'mixed': half
    of the slots with forget gates near 0 (the pairwise intra-chunk path), half ordinary."""
    B, T = (1, 4096) if varlen else (2, 2048)
    *inputs, h0 = make_inputs(B, T, 32, 8, K=128, V=128, M=64, dtype=torch.bfloat16, initial_state=True,
                              N=3 if varlen else None, seed=1, device="cuda", gate="near0" if gate == "mixed" else gate)
    if gate == "mixed":
        normal = make_inputs(B, T, 32, 8, K=128, V=128, M=64, dtype=torch.bfloat16, seed=2, device="cuda")
        inputs[3] = torch.cat([inputs[3][..., :32], normal[3][..., 32:]], -1)
        inputs[4] = torch.cat([inputs[4][..., :32], normal[4][..., 32:]], -1)
    kw = {"cu_seqlens": torch.tensor([0, 1000, 1001, 4096], device="cuda")} if varlen else {}
    out = run_with_grads(triton_chunk, inputs, h0, poison=True, **kw)
    ref = run_with_grads(chunk_gsa_torch, [x.detach().float() for x in inputs], h0, **kw)
    assert_close(out, ref, 1e-2)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
def test_real_shapes_mistral_decode():
    *inputs, h0 = make_inputs(16, 1, 32, 8, K=128, V=128, M=64, dtype=torch.bfloat16, initial_state=True, seed=2,
                              device="cuda")
    with poisoned_outputs():
        o, (hk, hv) = triton_step(*inputs, initial_state=h0, output_final_state=True)
    ro, (rk, rv) = naive_recurrent_gsa(*(x.float() for x in inputs), initial_state=h0, output_final_state=True)
    assert_close([o, hk, hv], [ro, rk, rv], 1e-2, names=["o", "final_k", "final_v"])
