"""The finetune losses from the model's final hidden states, without materialising full logits.

The next-token cross-entropy and the KL to the teacher need ``lm_head(h)`` over the whole vocabulary
for every token: in fp32 for SmolLM2 (49k tokens of vocabulary) at 8 x 2048 tokens that is 3 GiB a
copy, and the plain computation keeps several copies for the student and the teacher. Here the
output projection and both losses run a chunk of tokens at a time:

- ``chunked`` (pure torch, any device): each chunk's logits are computed, reduced to its loss sums and
  to the gradient of ``ce + kl_weight * kl`` with respect to the hidden states (and the head's weight
  when it trains), then dropped: the backward only scales what the forward stored, as liger-kernel's
  fused linear losses do, so no logits are recomputed. The projection runs in the dtype ``lm_head(h)``
  computes in under the ambient autocast and the losses in fp32, with the gradients' casts of autograd,
  so the values are the plain path's up to the order of the sums. With ``compiled`` (a run whose layers
  ``model.compile`` compiles) a chunk's work is one compiled function: its softmaxes, both losses and
  their gradient fuse into a few kernels between the matmuls. A head that is not a plain ``nn.Linear``
  (wrapped) is applied as a module a chunk at a time under ``torch.utils.checkpoint`` instead.
- ``liger``: liger-kernel's fused linear cross-entropy and fused linear JSD with ``beta=0`` (which is
  the forward KL, KL(teacher || student), the loss the plain path computes) on CUDA.
- ``off``: the plain computation over the model's full logits (``stage_loss_sum`` does it).

Both sums run over the positions that have a target (``target != -100``); the KL is
``t**2 * sum KL(softmax(teacher / t) || softmax(student / t))`` with temperature ``t``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import T2RError
from .liger import liger_imports

FUSED_CHOICES = ("auto", "liger", "chunked", "off")


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``t**2`` times the sum over rows of KL(softmax(teacher / t) || softmax(student / t)); fp32 logits [N, V]."""
    t = temperature
    log_p = F.log_softmax(teacher_logits / t, -1)
    log_q = F.log_softmax(student_logits / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum() * t * t


def liger_losses_module():
    """liger-kernel's fused linear cross-entropy and JSD classes, or the reason they do not import."""
    return liger_imports("liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss",
                         "liger_kernel.transformers.fused_linear_jsd.LigerFusedLinearJSD")


def resolve_fused(choice: str, device, sharded: bool = False) -> tuple[str, str]:
    """(the loss path a run uses: 'liger', 'chunked' or 'off'; why, in words) for ``loss.fused``. Under
    FSDP (``sharded``) chunked (``auto``) or the full logits: those two gave DDP's losses under FSDP2
    (``scripts/check_fsdp.sh --cpu``); liger's kernels need a GPU, so they have not run sharded yet."""
    device = torch.device(device)
    if choice not in FUSED_CHOICES:
        raise T2RError(f"loss.fused must be one of {', '.join(FUSED_CHOICES)}, got {choice!r}")
    if sharded and choice == "liger":
        raise T2RError("loss.fused: liger is not supported under FSDP yet; set loss.fused: auto or chunked "
                       "(the same losses in pure torch) or off (full logits)")
    if sharded and choice == "auto":
        return "chunked", "loss.fused: auto, under FSDP"
    if choice in ("chunked", "off"):
        return choice, f"loss.fused: {choice}"
    on_gpu = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "auto" and not on_gpu:
        return "chunked", "loss.fused: auto, not on CUDA"
    classes, why = liger_losses_module()
    if choice == "auto":
        return ("liger", "loss.fused: auto, on CUDA with liger-kernel") if classes else \
            ("chunked", f"loss.fused: auto, liger-kernel does not import ({why})")
    if classes is None:
        raise T2RError(f"loss.fused is 'liger' but liger-kernel does not import ({why}); install it with "
                       "pip install 't2r[fused]' (or liger-kernel), or set loss.fused: chunked "
                       "(the same losses, in pure torch)")
    if not on_gpu:
        raise T2RError(f"loss.fused is 'liger' but the run is on {device.type}: liger-kernel's Triton kernels need "
                       "a CUDA GPU; set loss.fused: chunked (or auto) off GPUs")
    return "liger", "loss.fused: liger"


def next_token_losses(hidden: torch.Tensor, head: nn.Module, target: torch.Tensor,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: nn.Module | None = None,
                      temperature: float = 1.0, kl_weight: float = 1.0, how: str = "chunked",
                      chunk_size: int = 1024, compiled: bool = False):
    """(``ce + kl_weight * kl``, cross-entropy sum, KL sum or None) over the positions whose ``target``
    is not -100; the first carries the gradients, the other two are for logging.

    ``hidden`` [..., D]: the student's final hidden states (what ``head``, its ``lm_head``, takes);
    ``target`` [...]: the token each position predicts. With ``teacher_hidden`` (computed without
    gradients) and ``teacher_head``, the KL to the teacher too. ``how``: 'chunked' or 'liger';
    ``compiled``: the chunked path's chunks run ``torch.compile``'d.
    """
    if how not in ("chunked", "liger"):
        raise ValueError(f"how must be 'chunked' or 'liger', got {how!r}")
    valid = (target != -100).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[valid]
    y = target.reshape(-1)[valid]
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[valid].detach() if teacher_hidden is not None else None
    plain = _plain_linear(head) and (th is None or _plain_linear(teacher_head))
    if how == "liger" and h.shape[0] > 0 and plain and head.bias is None and (th is None or teacher_head.bias is None):
        return _with_total(*_liger_losses(h, head, y, th, teacher_head, temperature), kl_weight)
    if plain:
        return _fused_linear_losses(h, head, y, th, teacher_head, temperature, kl_weight, chunk_size, compiled)
    return _with_total(*_checkpointed_losses(h, head, y, th, teacher_head, temperature, chunk_size), kl_weight)


def _with_total(ce, kl, kl_weight):
    """(ce + kl_weight * kl, with the gradients; ce and kl for logging)."""
    return (ce if kl is None else ce + kl_weight * kl), ce.detach(), (None if kl is None else kl.detach())


def _plain_linear(head) -> bool:
    """What the fused paths take apart (weight and bias); a wrapped head goes the checkpointed way."""
    return type(head) is nn.Linear


# -- chunked, a plain nn.Linear head: each chunk's gradient taken in the forward -----------------------
def _chunk_losses(h, w, b, y, th, tw, tb, temperature: float, kl_weight: float, grads: bool):
    """One chunk: (ce sum, KL sum or None, d(ce + kl_weight * KL)/d logits in the projection's dtype, or
    None without ``grads``). ``h``, ``w``, ``b`` (bias or None) are in the projection's dtype; the
    logits are taken in fp32 from there, as ``lm_head(h).float()`` under autocast."""
    logits = F.linear(h, w, b).float()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    ce = (lse - logits.gather(1, y[:, None])).sum()
    kl = None
    if th is not None:
        t = temperature
        log_q = F.log_softmax(logits / t, -1)
        log_p = F.log_softmax(F.linear(th, tw, tb).float() / t, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum() * t * t
    if not grads:
        return ce, kl, None
    # d ce / d logits = softmax - onehot(y); d (t^2 KL(p || softmax(logits / t))) / d logits = t (q - p)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    g = (logits - lse).exp() - (vocab == y[:, None]).float()  # pointwise, so it fuses (unlike a scatter)
    if th is not None:
        g = g + (kl_weight * temperature) * (log_q.exp() - log_p.exp())
    return ce, kl, g.to(h.dtype)


def _chunk_and_grads(h, w, b, y, th, tw, tb, temperature, kl_weight, grad_h: bool, grad_w: bool):
    """A chunk's losses and the gradients asked for: (ce, kl, d/dh, d/dw, d/db), each gradient None
    when not asked for (or no bias), in the projection's dtype as autograd's matmuls give them."""
    ce, kl, g = _chunk_losses(h, w, b, y, th, tw, tb, temperature, kl_weight, grad_h or grad_w)
    return (ce, kl, g @ w if grad_h else None, g.t() @ h if grad_w else None,
            g.sum(0) if grad_w and b is not None else None)


@functools.cache
def _compiled(fn):
    """``fn`` under ``torch.compile``, made once a process (dynamo caches its variants: a chunk's row
    count, with and without the teacher, which gradients)."""
    return torch.compile(fn)


def _chunk_sums(h, w, b, y, th, tw, tb, temperature, kl_weight, chunk_size, compiled, dtype, grad_h, grad_w):
    """(ce, kl or None, d/dh, d/dw, d/db) over chunks of ``chunk_size`` rows: the losses summed in fp32;
    ``h``'s gradient in its dtype (with ``grad_h``), the head's summed in fp32 (with ``grad_w``), else None.
    ``h``, ``w``, ``b`` are cast to ``dtype`` here; the teacher's ``th``, ``tw``, ``tb`` come cast."""
    step = _compiled(_chunk_and_grads) if compiled else _chunk_and_grads
    x, wc, bc = h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    ce = h.new_zeros((), dtype=torch.float32)
    kl = ce.clone() if th is not None else None
    dh = torch.empty_like(h) if grad_h else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grad_w else None
    db = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if grad_w and b is not None else None
    for s in range(0, h.shape[0], chunk_size):
        e = s + chunk_size
        c_ce, c_kl, c_dh, c_dw, c_db = step(x[s:e], wc, bc, y[s:e], None if th is None else th[s:e], tw, tb,
                                            temperature, kl_weight, grad_h, grad_w)
        ce += c_ce
        if kl is not None:
            kl += c_kl
        if grad_h:
            dh[s:e] = c_dh
        if grad_w:
            dw += c_dw
            if db is not None:
                db += c_db
    return ce, kl, dh, dw, db


class _FusedLinearLosses(torch.autograd.Function):
    """``ce + kl_weight * kl`` over chunks of rows of ``h`` through ``w`` and ``b`` (the head's own
    parameters, cast to ``dtype`` inside); their gradients are taken chunk by chunk in the forward and
    kept: ``h``'s (N x D), and when the head trains, its parameters' summed in fp32."""

    @staticmethod
    def forward(ctx, h, w, b, y, th, tw, tb, temperature, kl_weight, chunk_size, compiled, dtype):
        grad_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ce, kl, dh, dw, db = _chunk_sums(h, w, b, y, th, tw, tb, temperature, kl_weight, chunk_size, compiled, dtype,
                                         True, grad_w)
        ctx.save_for_backward(dh, dw, db)
        loss = ce if kl is None else ce + kl_weight * kl
        ctx.mark_non_differentiable(ce, *([kl] if kl is not None else []))
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g, *_):
        dh, dw, db = ctx.saved_tensors
        scaled = [None if d is None else (d * g).to(d.dtype) for d in (dh, dw, db)]
        return (*scaled,) + (None,) * 9


def _fused_linear_losses(h, head, y, th, teacher_head, temperature, kl_weight, chunk_size, compiled):
    """The chunked path for a plain ``nn.Linear`` head: (ce + kl_weight * kl, ce, kl). The student's
    projection in the dtype ``head(h)`` computes in, the teacher's in its own; with nothing to
    differentiate (evaluation, or no gradient wanted), the losses alone."""
    dtype = _compute_dtype(h, head.weight)
    w, b = head.weight, head.bias
    tx = tw = tb = None
    if th is not None:
        t_dtype = _compute_dtype(th, teacher_head.weight)  # the teacher's own, as teacher_head(th) computes
        tx, tw = th.to(t_dtype), teacher_head.weight.detach().to(t_dtype)
        tb = None if teacher_head.bias is None else teacher_head.bias.detach().to(t_dtype)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
            return _FusedLinearLosses.apply(h, w, b, y, tx, tw, tb, temperature, kl_weight, chunk_size, compiled,
                                            dtype)
        ce, kl, *_ = _chunk_sums(h, w, b, y, tx, tw, tb, temperature, kl_weight, chunk_size, compiled, dtype,
                                 False, False)
    return _with_total(ce, kl, kl_weight)


# -- chunked, any other head: each chunk checkpointed through the module ------------------------------
def _chunk(head, teacher_head, temperature, h, y, th=None):
    logits = head(h).float()
    ce = F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    if th is None:
        return (ce,)
    with torch.no_grad():
        teacher_logits = teacher_head(th).float()
    return ce, kl_sum(logits, teacher_logits, temperature)


def _checkpointed_losses(h, head, y, th, teacher_head, temperature, chunk_size):
    """Chunks of ``chunk_size`` rows through the head module; with gradients on, each chunk is
    checkpointed (its logits are recomputed in backward instead of kept). No rows: one empty chunk,
    so the zero loss still reaches every parameter of the graph (what the plain path and DDP expect)."""
    n = h.shape[0]
    starts = range(0, n, chunk_size) if n else [0]
    ce = kl = None
    for s in starts:
        args = (h[s:s + chunk_size], y[s:s + chunk_size]) + ((th[s:s + chunk_size],) if th is not None else ())
        if torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(_chunk, head, teacher_head, temperature, *args,
                                                    use_reentrant=False, preserve_rng_state=False)
        else:
            out = _chunk(head, teacher_head, temperature, *args)
        ce = out[0] if ce is None else ce + out[0]
        if th is not None:
            kl = out[1] if kl is None else kl + out[1]
    return ce, kl


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head(h)`` computes in: autocast's when it is on, else the promoted one."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _liger_losses(h, head, y, th, teacher_head, temperature):
    """liger-kernel: fused linear cross-entropy (sum), and fused linear JSD with beta 0, which is
    KL(teacher || student) averaged over the rows it gets (all have targets): times rows and t**2."""
    (LigerCE, LigerJSD), _ = liger_losses_module()
    dtype = _compute_dtype(h, head.weight)
    weight = head.weight.to(dtype)
    accum = torch.float32 if weight.requires_grad else None  # the head's gradient summed over chunks in fp32
    x = h.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        ce = LigerCE(reduction="sum", ignore_index=-100, accum_dtype=accum)(weight, x, y)
        if th is None:
            return ce.float(), None
        teacher_weight = teacher_head.weight.detach().to(dtype)
        t = temperature
        kl = LigerJSD(jsd_beta=0.0, temperature=t, accum_dtype=accum)(x, weight, th.to(dtype), teacher_weight, None)
    return ce.float(), kl.float() * (x.shape[0] * t * t)
