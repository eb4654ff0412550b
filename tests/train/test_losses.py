"""The finetune losses without full logits (loss.fused): the chunked path gives the losses and the
gradients of the plain fp32-logits computation; liger-kernel's too where it imports; whole runs agree."""
import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from t2r.errors import T2RError
from t2r.train.config import FinetuneStage, RunConfig
from t2r.train.losses import next_token_losses, resolve_fused
from t2r.train.stages import add_lora, set_trainable, stage_loss_sum
from tests.conftest import converted
from tests.kernels.gsa_inputs import rel_err
from tests.train.runs import ENV, ROOT, finetune_cmd, metrics, run

V, D = 97, 24


def plain_losses(hidden, head, target, teacher_hidden, teacher_head, t):
    """What stage_loss_sum computed before loss.fused: full fp32 logits, cross-entropy summed over
    targets, the KL over the positions that have one."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    valid = (target != -100).reshape(-1)
    log_p = F.log_softmax(teacher_logits.reshape(-1, V)[valid] / t, -1)
    log_q = F.log_softmax(logits.reshape(-1, V)[valid] / t, -1)
    return ce, (log_p.exp() * (log_p - log_q)).sum() * t * t


def problem(B=3, T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False)
    teacher_head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
        teacher_head.weight.copy_(head.weight + 0.1 * torch.randn(V, D, generator=g))
    hidden = torch.randn(B, T, D, generator=g).requires_grad_()
    teacher_hidden = hidden.detach() + 0.2 * torch.randn(B, T, D, generator=g)
    target = torch.randint(0, V, (B, T), generator=g)
    target[:, -1] = -100  # the last position predicts nothing
    target[0, 5:9] = -100
    if B > 1:
        target[1] = -100  # a row with no target at all
    return hidden, head, target, teacher_hidden, teacher_head


KL_WEIGHT = 0.5


def losses_and_grads(fn, hidden, head, *rest):
    """``fn``'s (ce, kl) or (ce + KL_WEIGHT * kl, ce, kl), and the gradients of ce + KL_WEIGHT * kl."""
    hidden = hidden.detach().requires_grad_()
    head.zero_grad(set_to_none=True)
    out = fn(hidden, head, *rest)
    loss, ce, kl = out if len(out) == 3 else (out[0] + KL_WEIGHT * out[1], *out)
    loss.backward()
    return ce.detach(), kl.detach(), hidden.grad, head.weight.grad.clone()


def assert_close(got, want, rtol=2e-6, atol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size,temperature", [(16, 1.0), (1, 2.0), (7, 0.5), (4096, 1.0)],
                         ids=["chunk16", "chunk1-t2", "chunk7-t0.5", "one-chunk"])
def test_chunked_gives_the_plain_losses_and_gradients(chunk_size, temperature):
    """111 positions, 73 with a target (not a multiple of any chunk size), one row without targets."""
    hidden, head, target, th, thead = problem()
    ref = losses_and_grads(plain_losses, hidden, head, target, th, thead, temperature)

    def chunked(h, hd, y, th_, thd, t):
        return next_token_losses(h, hd, y, th_, thd, t, KL_WEIGHT, how="chunked", chunk_size=chunk_size)

    got = losses_and_grads(chunked, hidden, head, target, th, thead, temperature)
    for a, b in zip(got, ref):
        assert_close(a, b)
    assert got[2][1].abs().max() == 0 and got[2][:, -1].abs().max() == 0  # no target, no gradient


def test_chunked_backward_recomputes_no_logits():
    """The chunked path takes each chunk's gradient in its forward: its backward runs no matmul (the
    plain path's runs two), and its losses and gradients are the plain ones."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, head, target, th, thead = problem()
    flops = {}
    for name, fn in (("plain", plain_losses),
                     ("chunked", lambda *a: next_token_losses(*a, KL_WEIGHT, chunk_size=16)[0])):
        h = hidden.detach().requires_grad_()
        out = fn(h, head, target, th, thead, 1.0)
        loss = out if name == "chunked" else out[0] + KL_WEIGHT * out[1]
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops[name] = counter.get_total_flops()
    assert flops["plain"] > 0 and flops["chunked"] == 0


@pytest.mark.parametrize("head_kind", ["bias", "wrapped", "bf16-teacher"])
def test_chunked_with_other_heads(head_kind):
    """A head with a bias (fused: its gradient summed over chunks), one wrapped in another module
    (each chunk checkpointed through it), and a bf16 teacher beside an fp32 student (its logits in
    bf16, as teacher_head(th) gives them) give the plain losses and gradients too."""
    hidden, head, target, th, thead = problem()
    if head_kind == "bf16-teacher":
        thead, th = thead.to(torch.bfloat16), th.to(torch.bfloat16)
    biased = torch.nn.Linear(D, V, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0, 0.5)
    student = {"bias": biased, "wrapped": torch.nn.Sequential(head)}.get(head_kind, head)
    ref_h, ref_w = {}, {}
    for name, fn in (("plain", plain_losses),
                     ("chunked", lambda *a: next_token_losses(*a, KL_WEIGHT, chunk_size=16))):
        h = hidden.detach().requires_grad_()
        student.zero_grad(set_to_none=True)
        out = fn(h, student, target, th, thead, 1.5)
        loss, ce, kl = out if len(out) == 3 else (out[0] + KL_WEIGHT * out[1], *out)
        loss.backward()
        ref_h[name] = (ce.detach(), kl.detach(), h.grad)
        ref_w[name] = [p.grad.clone() for p in student.parameters()]
    for a, b in zip(ref_h["chunked"], ref_h["plain"]):
        assert_close(a, b)
    for a, b in zip(ref_w["chunked"], ref_w["plain"]):
        assert_close(a, b)


def test_compiled_chunks_give_the_plain_losses_and_gradients():
    """model.compile's chunks (torch.compile, inductor on the CPU): 73 targets in chunks of 16, so a
    ragged last chunk; then a batch with no target at all, through the same compiled function."""
    hidden, head, target, th, thead = problem()
    ref = losses_and_grads(plain_losses, hidden, head, target, th, thead, 2.0)

    def compiled(h, hd, y, th_, thd, t):
        return next_token_losses(h, hd, y, th_, thd, t, KL_WEIGHT, how="chunked", chunk_size=16, compiled=True)

    got = losses_and_grads(compiled, hidden, head, target, th, thead, 2.0)
    for a, b in zip(got, ref):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    none = torch.full_like(target, -100)
    loss, ce, kl = compiled(hidden, head, none, th, thead, 2.0)
    assert loss.item() == 0 and ce.item() == 0 and kl.item() == 0


def test_chunked_without_teacher_and_without_targets():
    hidden, head, target, th, thead = problem(B=2, T=9)
    loss, ce, kl = next_token_losses(hidden, head, target, chunk_size=4)
    ref = F.cross_entropy(head(hidden).reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
    assert kl is None
    assert_close(ce, ref)
    assert_close(loss, ref)
    # no target anywhere: zero losses that still backpropagate (zero gradients reach every parameter)
    none = torch.full_like(target, -100)
    loss, ce, kl = next_token_losses(hidden, head, none, th, thead, chunk_size=4)
    loss.backward()
    assert ce.item() == 0 and kl.item() == 0
    assert hidden.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_without_gradients_gives_the_same_losses(compiled):
    """Under no_grad (evaluation) the chunks compute the losses alone: the same values."""
    hidden, head, target, th, thead = problem()
    loss, ce, kl = next_token_losses(hidden, head, target, th, thead, 1.5, KL_WEIGHT, chunk_size=16, compiled=compiled)
    with torch.no_grad():
        got = next_token_losses(hidden, head, target, th, thead, 1.5, KL_WEIGHT, chunk_size=16, compiled=compiled)
    assert got[0].grad_fn is None
    for a, b in zip(got, (loss, ce, kl)):
        assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_chunked_follows_autocast_like_the_plain_path():
    """Under bf16 autocast the projection runs in bf16 in both (the plain path's lm_head(h)), the
    losses in fp32."""
    hidden, head, target, th, thead = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = losses_and_grads(plain_losses, hidden, head, target, th, thead, 1.0)
        got = losses_and_grads(lambda *a: next_token_losses(*a, KL_WEIGHT, chunk_size=16), hidden, head, target, th,
                               thead, 1.0)
    for a, b in zip(got[:2], ref[:2]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2:], ref[2:]):  # bf16 products: they differ by bf16 roundings (2**-8 = 3.9e-3)
        assert rel_err(a, b) < 1e-2


def _batch(ids, packed):
    labels = ids.clone()
    if packed:  # two rows of packed documents: cu_seqlens over the flattened batch
        return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, 7, 23, 30, 41, 46])}
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a right-padded row
    return {"input_ids": ids, "labels": labels.masked_fill(mask == 0, -100), "attention_mask": mask}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora,packed", [(False, False), (True, True)],
                         ids=["full-frozen-teacher-padded", "lora-adapters-off-teacher-packed"])
def test_stage_loss_sum_chunked_equals_off(lora, packed):
    """A converted model's whole finetune loss (cross-entropy + KL to the teacher): the same sums
    and the same gradients on every trained parameter (lm_head tied to the embeddings included)."""
    _, model, _ = converted("llama", softmax_layers="1", num_slots=8)
    stage = FinetuneStage(name="finetune", steps=1, lr=1e-3, kl_weight=0.5, kl_temperature=1.5,
                          lora={"rank": 4} if lora else None)
    teacher = None
    if lora:
        model = add_lora(model, stage.lora)
        with torch.no_grad():  # adapters that do something, so the student differs from the teacher
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    else:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        with torch.no_grad():  # the student has moved away from the teacher
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    set_trainable(model, stage)
    model.train()
    batch = _batch(torch.randint(2, 258, (2, 23)), packed)
    results = {}
    for fused in ("off", "chunked"):
        model.zero_grad(set_to_none=True)
        loss, parts = stage_loss_sum(model, batch, stage, teacher, fused=fused, chunk_size=10)
        loss.backward()
        results[fused] = (loss.detach(), parts, _grads(model))
    (l0, p0, g0), (l1, p1, g1) = results["off"], results["chunked"]
    assert_close(l1, l0)
    assert p0.keys() == p1.keys() == {"ce", "kl"} and p0["kl"] > 0
    for k in p0:
        assert_close(p1[k], p0[k])
    assert g0.keys() == g1.keys() and len(g0) > 0
    if not lora:
        assert "lm_head.weight" in g0 or "model.embed_tokens.weight" in g0
    for n in g0:  # fp32 sums in another order, carried back through the layers: ||g1 - g0|| / ||g0|| up to
        # ~1e-5 here (single elements summed with cancellation: ~1e-4); in fp64 the two agree far closer
        err = ((g1[n] - g0[n]).double().norm() / g0[n].double().norm()).item()
        assert err < 5e-5, f"{n}: relative error {err:.1e}"


def test_loss_fused_config_and_resolution(tmp_path):
    base = {"model": {"source": "tiny-random-llama"}, "data": {"dataset": "python-stdlib"},
            "stages": [{"name": "finetune", "steps": 1, "lr": 1e-3}]}
    assert RunConfig.model_validate(base).loss.fused == "auto"
    with pytest.raises(Exception, match="fused"):
        RunConfig.model_validate({**base, "loss": {"fused": "fast"}})
    # YAML reads a bare `fused: off` as False
    assert RunConfig.model_validate({**base, "loss": {"fused": False}}).loss.fused == "off"
    assert resolve_fused("auto", "cpu")[0] == "chunked"
    assert resolve_fused("off", "cpu")[0] == "off"
    assert resolve_fused("auto", "cuda", sharded=True) == ("chunked", "loss.fused: auto, under FSDP")
    assert resolve_fused("off", "cuda", sharded=True)[0] == "off"
    with pytest.raises(T2RError, match="liger is not supported under FSDP yet; set loss.fused: auto or chunked"):
        resolve_fused("liger", "cuda", sharded=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(T2RError, match="loss.fused"):
            resolve_fused("liger", "cpu")


LIGER = importlib.util.find_spec("liger_kernel") is not None

LIGER_CHECK = textwrap.dedent("""
    import sys
    import torch
    from t2r.train.losses import liger_losses_module, next_token_losses
    from tests.train.test_losses import KL_WEIGHT, losses_and_grads, problem
    classes, why = liger_losses_module()
    if classes is None:
        print(why)
        sys.exit(77)
    hidden, head, target, th, thead = problem(T=21)
    for t in (1.0, 2.0):
        ref = losses_and_grads(lambda *a: next_token_losses(*a, KL_WEIGHT, how="chunked", chunk_size=8),
                               hidden, head, target, th, thead, t)
        got = losses_and_grads(lambda *a: next_token_losses(*a, KL_WEIGHT, how="liger"), hidden, head, target, th,
                               thead, t)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("liger matches")
""")


@pytest.mark.skipif(not LIGER, reason="liger-kernel is not installed (pip install 't2r[fused]')")
def test_liger_gives_the_chunked_losses_and_gradients():
    """liger-kernel's fused linear cross-entropy and JSD (beta 0 = forward KL), on CPU through the Triton
    interpreter, in a fresh process (Triton reads TRITON_INTERPRET when kernels are defined)."""
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", LIGER_CHECK], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**ENV, "TRITON_INTERPRET": "1", "PYTHONPATH": path})
    if r.returncode == 77:
        pytest.skip(f"liger-kernel does not import here: {r.stdout.strip()}")
    assert r.returncode == 0 and "liger matches" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_a_tiny_finetune_run_has_the_same_losses_off_and_chunked(tmp_path):
    """configs/tiny.yaml, shortened (LoRA; the KL to the adapters-off teacher): every step's losses
    agree to 1e-5 (test_stage_loss_sum_chunked_equals_off covers the full finetune's frozen teacher)."""
    short = ["stages.0.steps=1", "stages.1.steps=3", "eval.teacher=false", "eval.before=false",
             "eval.max_batches=1", "checkpoint.every_steps=100", f"data.cache_dir={tmp_path / 'cache'}",
             "logging.tensorboard=false", "loss.chunk_size=100"]
    got = {}
    for fused in ("off", "chunked"):
        r = run(finetune_cmd(tmp_path / fused, *short, f"loss.fused={fused}"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"finetune losses: {fused}" in r.stdout
        got[fused] = metrics(tmp_path / fused)
    assert [m["stage"] for m in got["chunked"]] == ["attention_transfer"] + ["finetune"] * 3
    assert len(got["off"]) == 4 and all(m["kl"] > 0 for m in got["off"][1:])
    for a, b in zip(got["off"], got["chunked"]):
        for key in ("loss", "ce", "kl", "transfer_mse"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
