"""Exact softmax attention over a sliding window of the last W tokens, with its log-normaliser.

The hybrid GSA layer (``window_size`` W > 0) attends exactly to the last W tokens and reads
everything older from the GSA state. This computes the window part block by block: queries in
blocks of W see the keys of their own block and the block before, masked to (t - W, t], so
time and memory grow linearly with T (a [B, heads, T/W, W, 2W] score tensor). Plain torch, on
any device, differentiated by autograd; it returns the softmax normaliser (log-sum-exp) too,
which the layer needs to mix the window with the GSA part and which SDPA does not give.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _left_pad(x: torch.Tensor, before: int, after: int, value=0) -> torch.Tensor:
    """Pad dim 1 of x with ``before`` entries in front and ``after`` behind."""
    if before == 0 and after == 0:
        return x
    pad = [0, 0] * (x.ndim - 2) + [before, after]
    return F.pad(x, pad, value=value)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                     key_valid: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
    """Softmax attention of each query over the last ``window`` keys (itself included).

    q [B, T, HQ, D] are the queries of the *last* T positions of k and v [B, P + T, H, D]
    (P earlier positions: a decoding cache; P <= window). ``key_valid`` [B, P + T] bool marks real
    keys (False: padding); ``doc_ids`` [B, P + T] keeps attention inside a document (packed rows).
    Each query always sees itself, so padding rows stay finite.

    Returns o [B, T, HQ, D] in q's dtype and the log-sum-exp of the scaled scores [B, T, HQ] (fp32).
    """
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    P, W, G = S - T, window, HQ // H
    if not 0 <= P <= W:
        raise ValueError(f"window_attention: {P} cached positions for a window of {W}")
    NB = -(-T // W)
    # keys of absolute positions P - W ... P + NB * W - 1: query r (position P + r) sees r+1 .. r+W
    front, back = W - P, NB * W - T
    kp = _left_pad(k, front, back).view(B, NB + 1, W, H, D)
    vp = _left_pad(v, front, back).view(B, NB + 1, W, H, D)
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
    valid = _left_pad(valid, front, back, value=False).view(B, NB + 1, W)
    kb = torch.cat([kp[:, :-1], kp[:, 1:]], 2)  # [B, NB, 2W, H, D]
    vb = torch.cat([vp[:, :-1], vp[:, 1:]], 2)
    vk = torch.cat([valid[:, :-1], valid[:, 1:]], 2)  # [B, NB, 2W]
    qb = _left_pad(q, 0, back).view(B, NB, W, H, G, D)
    scores = torch.einsum("bnrhgd,bnchd->bnhgrc", qb, kb).float() * scale
    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    allowed = ((c > r) & (c <= r + W))[None, None] & vk[:, :, None, :]  # [B, NB, W, 2W]
    if doc_ids is not None:
        dp = _left_pad(doc_ids, front, back, value=-1).view(B, NB + 1, W)
        kd = torch.cat([dp[:, :-1], dp[:, 1:]], 2)
        allowed = allowed & (kd[:, :, None, :] == dp[:, 1:, :, None])
    allowed = allowed | (c == r + W)[None, None]  # each query sees itself
    scores = scores.masked_fill(~allowed[:, :, None, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, NB, H, G, W]
    p = torch.exp(scores - lse[..., None]).to(v.dtype)
    o = torch.einsum("bnhgrc,bnchd->bnrhgd", p, vb).reshape(B, NB * W, HQ, D)[:, :T]
    lse = lse.permute(0, 1, 4, 2, 3).reshape(B, NB * W, HQ)[:, :T]
    return o.to(q.dtype), lse


def ring_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """One decoding step of :func:`window_attention` over a ring buffer: q [B, 1, HQ, D] attends to
    the W entries of k and v [B, W, H, D] (the last W tokens, this one included, in any order)
    where ``valid`` [B, W] is True. Returns o [B, 1, HQ, D] in q's dtype and the log-sum-exp
    [B, 1, HQ] (fp32), as :func:`window_attention` computes them."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    scores = torch.einsum("bthgd,bwhd->bthgw", q.view(B, T, H, HQ // H, D), k).float() * scale
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, T, H, G]
    p = torch.exp(scores - lse[..., None]).to(v.dtype)
    o = torch.einsum("bthgw,bwhd->bthgd", p, v).reshape(B, T, HQ, D)
    return o.to(q.dtype), lse.reshape(B, T, HQ)
