"""The gla operator on fla's Triton kernels (backend 'triton') against the fp64 loop: outputs, final
states and every gradient, on odd lengths, GQA, packed varlen rows with an empty sequence and extreme
gates; on CPU through the Triton interpreter (triton_interp.fla_interpreter). And which backend runs."""
from types import SimpleNamespace

import pytest
import torch

from t2r.errors import T2RError
from t2r.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla
from t2r.kernels.gsa import backend as backend_mod
from t2r.kernels.gsa import resolve_backend
from t2r.kernels.gla.fla_kernels import FLA
from tests.kernels.test_gla_torch import NAMES, _grads, make_gla_inputs
from tests.kernels.triton_interp import CUDA, DEVICE, fla_interpreter, poisoned_outputs

TOL = 5e-3 if CUDA else 1e-4  # fla's fp32 dots may run in tf32 on the GPU


@pytest.fixture()
def fla_kernels():
    pytest.importorskip("triton")
    if not backend_mod.module_available("fla"):  # not importorskip: fla must be imported in the interpreter
        pytest.skip('fla is not installed: pip install "t2r[fla]"')
    with fla_interpreter(), poisoned_outputs():
        yield


def _compare(fn, inputs, h0, tol=TOL, ref_fn=naive_recurrent_gla):
    """Every output and gradient within ``tol`` of the fp64 loop's, relative to its norm; dg's
    error relative to dq's norm, the scale of the terms fla's dg is a difference of (with gates
    near 0, a ~ 1e-13, the true dg is ~1e-13 and fla's carries fp32 rounding of those terms)."""
    ref = _grads(ref_fn, [x.double() for x in inputs], h0.double())
    out = _grads(fn, inputs, h0)
    dq_norm = ref[NAMES.index("dq")].double().norm()
    for name, a, b in zip(NAMES, out, ref):
        a, b = a.double(), b.double()
        scale = torch.maximum(b.norm(), dq_norm) if name == "dg" else b.norm()
        err = ((a - b).norm() / scale).item() if torch.isfinite(a).all() else float("inf")  # NaN never passes
        assert err < tol, (name, err)


def _on_device(inputs, h0):
    return [x.to(DEVICE) for x in inputs], h0.to(DEVICE)


def _fla(op, **fixed):
    return lambda *a, **kw: op(*a, backend="triton", **fixed, **kw)


@pytest.mark.parametrize("T", [1, 63, 64, 67])
@pytest.mark.parametrize("G", [1, 3])
def test_chunk_matches_naive(fla_kernels, T, G):
    inputs, h0 = _on_device(*make_gla_inputs(2, T, 2 * G, 2, K=16, V=32, seed=T + G))
    _compare(_fla(chunk_gla), inputs, h0, tol=TOL)


@pytest.mark.parametrize("gate", ["near0", "near1", "none", "head"])
def test_extreme_and_fixed_gates(fla_kernels, gate):
    inputs, h0 = _on_device(*make_gla_inputs(1, 70, 4, 2, K=16, V=16, gate=gate, seed=3))
    _compare(_fla(chunk_gla), inputs, h0, tol=TOL)


def test_varlen_resets_state_at_each_boundary(fla_kernels):
    cu = torch.tensor([0, 1, 1, 20, 90, 97], dtype=torch.int32, device=DEVICE)
    inputs, h0 = _on_device(*make_gla_inputs(1, 97, 6, 2, K=16, V=16, N=5, seed=5))
    _compare(_fla(chunk_gla, cu_seqlens=cu), inputs, h0, tol=TOL,
             ref_fn=lambda *a, **kw: naive_recurrent_gla(*a, cu_seqlens=cu, **kw))


def test_decoding_matches_naive(fla_kernels):
    inputs, h0 = _on_device(*make_gla_inputs(3, 2, 6, 2, K=16, V=32, seed=7))
    _compare(_fla(fused_recurrent_gla), inputs, h0, tol=TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_stay_close_to_fp32(fla_kernels, dtype):
    """What a half-precision model runs: outputs in its dtype, the state in fp32."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("fla's kernels on bf16 are ~1e10 off in the Triton interpreter (fp16 and fp32 match); GPU only")
    inputs, h0 = _on_device(*make_gla_inputs(2, 40, 6, 2, K=16, V=16, seed=9))
    o, S = chunk_gla(*(x.to(dtype) for x in inputs), initial_state=h0, output_final_state=True, backend="triton")
    o_ref, S_ref = naive_recurrent_gla(*inputs, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert ((o.float() - o_ref).norm() / o_ref.norm()) < 2e-2
    assert ((S - S_ref).norm() / S_ref.norm()) < 2e-2


# -- which backend runs --------------------------------------------------------------------------

CUDA_X = SimpleNamespace(is_cuda=True)  # resolve_backend reads only .is_cuda


def _installed(monkeypatch, *names):
    monkeypatch.setattr(backend_mod, "module_available", lambda name: name in names)


def test_auto_takes_fla_on_cuda_only_when_installed(monkeypatch):
    monkeypatch.delenv("T2R_GSA_BACKEND", raising=False)
    _installed(monkeypatch, "triton", "fla")
    assert resolve_backend("auto", CUDA_X, needs=FLA) == "triton"
    assert resolve_backend(None, torch.zeros(1), needs=FLA) == "torch"
    _installed(monkeypatch, "triton")
    assert resolve_backend("auto", CUDA_X, needs=FLA) == "torch"
    assert resolve_backend("auto", CUDA_X) == "triton"  # GSA's kernels need triton alone


def test_triton_without_fla_says_how_to_install(monkeypatch):
    _installed(monkeypatch, "triton")
    inputs, _ = make_gla_inputs(1, 3, 2, 2)
    for op in (chunk_gla, fused_recurrent_gla):
        with pytest.raises(T2RError, match=r'^backend=.triton. needs the fla package: pip install "t2r\[fla\]"'):
            op(*inputs, backend="triton")
    monkeypatch.setenv("T2R_GSA_BACKEND", "triton")  # the environment variable asks the same
    with pytest.raises(T2RError, match="needs the fla package"):
        chunk_gla(*inputs)


def test_gsa_backend_reaches_the_gla_operator(monkeypatch):
    """A gla model with gsa_backend='triton' and no fla fails with the install hint, not silently on torch."""
    from tests.conftest import converted

    _installed(monkeypatch, "triton")
    _, model, _ = converted(mixer="gla")
    model.config.gsa_backend = "triton"
    model = type(model)(model.config)
    with pytest.raises(T2RError, match="needs the fla package"):
        model(torch.tensor([[1, 2, 3]]))


def test_a_gla_model_on_fla_matches_its_torch_path(fla_kernels):
    """A converted gla model (GQA: 4 query heads, 2 kv heads) with gsa_backend='triton': the forward,
    a packed-documents forward (cu_seqlens) and token-by-token decoding equal the torch path's."""
    from tests.conftest import decode_token_by_token
    from tests.layers.test_gla import mixer_model

    torch_model, _ = mixer_model("gla")
    config = torch_model.config
    config.gsa_backend = "triton"
    fla_model = type(torch_model)(config).to(DEVICE)
    fla_model.load_state_dict(torch_model.state_dict())
    torch_model.to(DEVICE).config.gsa_backend = "torch"
    for layer in torch_model.modules():  # the layers read the setting when built
        if hasattr(layer, "backend"):
            layer.backend = "torch"
    ids = torch.randint(2, 258, (2, 20), device=DEVICE)
    cu = torch.tensor([0, 5, 16, 20, 33, 40], device=DEVICE)
    with torch.no_grad():
        for kw in ({}, {"cu_seqlens": cu}):
            a, b = fla_model(ids, **kw).logits, torch_model(ids, **kw).logits
            assert ((a - b).norm() / b.norm()) < TOL, kw
        full = torch_model(ids[:, :10]).logits
    decoded, _ = decode_token_by_token(fla_model, ids[:, :10], 7)
    assert ((decoded - full).norm() / full.norm()) < TOL
