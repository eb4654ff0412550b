"""The finetune losses from the model's final hidden states, without materialising full logits.

The next-token cross-entropy and the KL to the teacher need ``lm_head(h)`` over the whole vocabulary
for every token: in fp32 for SmolLM2 (49k tokens of vocabulary) at 8 x 2048 tokens that is 3 GiB a
copy, and the plain computation keeps several copies for the student and the teacher. Here the
output projection and both losses run a chunk of tokens at a time:

- ``chunked`` (pure torch, any device): each chunk's logits are computed, reduced to its loss sums and
  dropped; backward recomputes the chunk (``torch.utils.checkpoint``). The projection goes through the
  model's own ``lm_head`` under the ambient autocast and the losses are taken in fp32, exactly as the
  plain path computes them, so the values are the same up to the order of the sums. With
  ``compiled`` (a run whose layers ``model.compile`` compiles) the chunk's work is one compiled
  function: its softmaxes, the cross-entropy and the KL fuse into a few kernels, a few launches a chunk.
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
                      temperature: float = 1.0, how: str = "chunked", chunk_size: int = 1024,
                      compiled: bool = False):
    """(cross-entropy sum, KL sum or None) over the positions whose ``target`` is not -100.

    ``hidden`` [..., D]: the student's final hidden states (what ``head``, its ``lm_head``, takes);
    ``target`` [...]: the token each position predicts. With ``teacher_hidden`` (computed without
    gradients) and ``teacher_head``, the KL to the teacher too. ``how``: 'chunked' or 'liger';
    ``compiled``: the chunked path's chunks run ``torch.compile``'d.
    """
    valid = (target != -100).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[valid]
    y = target.reshape(-1)[valid]
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[valid].detach() if teacher_hidden is not None else None
    if how == "liger" and h.shape[0] > 0 and _plain_linear(head) and (th is None or _plain_linear(teacher_head)):
        return _liger_losses(h, head, y, th, teacher_head, temperature)
    if how not in ("chunked", "liger"):
        raise ValueError(f"how must be 'chunked' or 'liger', got {how!r}")
    return _chunked_losses(h, head, y, th, teacher_head, temperature, chunk_size,
                           _compiled_chunk() if compiled else _chunk)


def _plain_linear(head) -> bool:
    # what the liger kernels fuse (a wrapped head, or one with a bias, goes the chunked way)
    return type(head) is nn.Linear and head.bias is None


def _chunk(head, teacher_head, temperature, h, y, th=None):
    logits = head(h).float()
    ce = F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    if th is None:
        return (ce,)
    with torch.no_grad():
        teacher_logits = teacher_head(th).float()
    return ce, kl_sum(logits, teacher_logits, temperature)


@functools.cache
def _compiled_chunk():
    """``_chunk`` under ``torch.compile``, made once a process (its compiled variants are cached by
    dynamo: a chunk's row count, with and without the teacher, training or not)."""
    return torch.compile(_chunk)


def _chunked_losses(h, head, y, th, teacher_head, temperature, chunk_size, chunk_fn=_chunk):
    """Chunks of ``chunk_size`` rows, each through ``chunk_fn``; with gradients on, each chunk is
    checkpointed (its logits are recomputed in backward instead of kept). No rows: one empty chunk,
    so the zero loss still reaches every parameter of the graph (what the plain path and DDP expect)."""
    n = h.shape[0]
    starts = range(0, n, chunk_size) if n else [0]
    ce = kl = None
    for s in starts:
        args = (h[s:s + chunk_size], y[s:s + chunk_size]) + ((th[s:s + chunk_size],) if th is not None else ())
        if torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(chunk_fn, head, teacher_head, temperature, *args,
                                                    use_reentrant=False, preserve_rng_state=False)
        else:
            out = chunk_fn(head, teacher_head, temperature, *args)
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
