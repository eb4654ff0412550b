"""Intra-chunk building blocks shared by the chunked GSA Triton kernels.

Inside a chunk of C tokens, with b = cumsum(g) per slot from the chunk start, every pass uses
the decay D[t, i, m] = exp(b[t, m] - b[i, m]) for i <= t. Three contractions appear:

    op1   Y[t, m] = sum_{i<t} X[t, i] F[i, m] D[t, i, m]     (slot logits; dp)
    op1t  Y[i, m] = sum_{t>i} X[t, i] F[t, m] D[t, i, m]     (ds)
    op2   X[t, i] = sum_m P[t, m] F[i, m] D[t, i, m], i <= t (pass-2 scores; dq/dk scores)

op1 and op1t leave out the diagonal i = t (D = 1 there; callers add X[t, t] F[t] themselves):
the gate gradient needs the off-diagonal parts alone, because the diagonal terms cancel exactly
between the query side and the key side, and subtracting them in floating point would leave
rounding noise far above the true gradient when the forget gates are near 0.

Three exact evaluations, chosen per (chunk, kv head) at run time (the gate "regime"; which blocks of a
model's gates take which: kernels/gsa/utils.py:chunk_regimes, scripts/gate_regimes.py):

* FACTORED: D = exp(b_t - r) * exp(r - b_i), one tensor-core product, with r = b at the chunk's
  middle token (row C/2 - 1) per slot. Used only when every |b - r| in the chunk is <= THRESH, so
  neither factor can overflow (and nothing is multiplied by inf). Taking r in the middle rather than
  at the chunk start lets a chunk decay by up to 2 * THRESH in total and stay factored: on a fresh
  SmolLM2 conversion that sends 7% of the (chunk, kv head) blocks elsewhere instead of 44%.
* BLOCKED: the same per sub-block of SUB key rows, with r_s = b at the sub-block's middle row: one
  product per sub-block s, restricted to its key columns i, against exp(b_t - r_s) on the query rows
  t from the sub-block on. Inside the sub-block both factors stay within e^THRESH; after it
  b_t - r_s <= 0 (b only falls), so nothing overflows there for any gate. Used when every sub-block
  stays within THRESH of its middle (chunks that decay by up to 2 * THRESH per SUB tokens): on that
  SmolLM2 conversion, all of the 7% (scripts/gate_regimes.py). C / SUB products instead of one.
* PAIRWISE: a loop over the C key positions with exp(min(b_t - b_j, 0)) masked to i <= t. Exact
  for any gates (e.g. g = -30 per step, forget gates near 0); slowest, taken only for such chunks.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .utils import BLOCKED as _BLOCKED
from .utils import FACTORED as _FACTORED
from .utils import PAIRWISE as _PAIRWISE
from .utils import SUB as _SUB
from .utils import THRESH

# THRESH (largest |cumulative log gate| from a chunk's or sub-block's middle row for the factored / blocked
# form), the rows per sub-block and the regimes' codes, as the host side (utils.chunk_regimes) has them.
SUB = tl.constexpr(_SUB)
FACTORED = tl.constexpr(_FACTORED)
BLOCKED = tl.constexpr(_BLOCKED)
PAIRWISE = tl.constexpr(_PAIRWISE)
_CLAMP = tl.constexpr(THRESH)

# Running in the Triton interpreter (CPU tests): a few helpers take a formulation the interpreter
# evaluates quickly (same values). Read when the module is (re)loaded, like Triton itself does.
INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# Reductions and scans through tl.reduce / tl.associative_scan with the standard combine
# functions (exactly what tl.sum / tl.max / tl.cumsum do). The Triton interpreter recognises
# these, and unlike tl.sum & co. (which are @jit functions of triton.language itself) they also
# run when triton was imported before TRITON_INTERPRET was set (the CPU test suite's case).
@triton.jit
def vsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def vmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def vcumsum(x, REVERSE: tl.constexpr):
    """Cumulative sum along axis 0 (from the end when REVERSE)."""
    return tl.associative_scan(x, 0, tl.standard._sum_combine, REVERSE)


@triton.jit
def chunk_gates(g_ptr, base, row_stride, o_t, m_t, o_m, m_m, C: tl.constexpr, THR: tl.constexpr):
    """Load g [C, BM] of one chunk and kv head; return b = cumsum(g), b at the chunk end, exp(b)
    (the decay from the chunk start, <= 1), exp(r - b) (the factored operand's, clamped, used only
    by the FACTORED and BLOCKED regimes; r: b at the middle row of the chunk, or of the row's sub-block)
    and the run-time regime (FACTORED, BLOCKED or PAIRWISE)."""
    gg = tl.load(g_ptr + base + o_t[:, None] * row_stride + o_m[None, :],
                 mask=m_t[:, None] & m_m[None, :], other=0.).to(tl.float32)
    b = vcumsum(gg, False)
    b_end = vsum(tl.where(o_t[:, None] == C - 1, b, 0.), 0)
    d = b - middle_row(b, o_t, C)[None, :]
    regime = tl.where(vmax(vmax(tl.abs(d), 1), 0) <= THR, FACTORED, PAIRWISE)
    if C > SUB:
        if regime != FACTORED:  # the sub-blocks' references only for chunks the factored form cannot take
            d = b - block_refs(b, o_t, C)
            regime = tl.where(vmax(vmax(tl.abs(d), 1), 0) <= THR, BLOCKED, PAIRWISE)
    eb = tl.exp(tl.minimum(b, THR))
    enb = tl.exp(tl.minimum(-d, THR))
    return b, b_end, eb, enb, regime


@triton.jit
def middle_row(b, o, C: tl.constexpr):
    """b at row C/2 - 1, the factored form's reference r, as [BM]."""
    return vsum(tl.where(o[:, None] == C // 2 - 1, b, 0.), 0)


@triton.jit
def block_refs(b, o, C: tl.constexpr):
    """[C, BM]: for each row, b at the middle row (SUB/2 - 1) of its sub-block of SUB rows."""
    r = tl.full(b.shape, 0., tl.float32)
    for s in tl.static_range(C // SUB):
        r = tl.where((o[:, None] // SUB) == s, block_ref(b, o, s)[None, :], r)
    return r


@triton.jit
def block_ref(b, o, s: tl.constexpr):
    """r_s: b at the middle row (SUB/2 - 1) of sub-block s, as [BM]."""
    return _row(b, o, s * SUB + SUB // 2 - 1)


@triton.jit
def block_exp(b, o, s: tl.constexpr):
    """exp(b_t - r_s) [C, BM] on the rows t from sub-block s on, 0 before it (BLOCKED chunks only: <= e^THRESH
    inside the sub-block, <= 1 after it)."""
    return tl.where(o[:, None] >= s * SUB, tl.exp(tl.minimum(b - block_ref(b, o, s)[None, :], _CLAMP)), 0.)


@triton.jit
def rel_exp(b, C: tl.constexpr):
    """exp(b - r) [C, BM] (FACTORED chunks only: |b - r| <= THRESH)."""
    return tl.exp(b - middle_row(b, tl.arange(0, C), C)[None, :])


@triton.jit
def _row(x, o, j):
    """Row j of a [C, N] register tile, as [N]."""
    return vsum(tl.where(o[:, None] == j, x, 0.), 0)


@triton.jit
def _col(x, o, j):
    """Column j of a [C, C] register tile, as [C]."""
    return vsum(tl.where(o[None, :] == j, x, 0.), 1)


@triton.jit
def diag(X, C: tl.constexpr):
    """X[t, t] of a [C, C] tile, as [C]."""
    o = tl.arange(0, C)
    return vsum(tl.where(o[:, None] == o[None, :], X, 0.), 1)


@triton.jit
def op1(X, F, Fn, b, eb, regime, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Y[t, m] = sum_{i<t} X[t, i] F[i, m] exp(b[t, m] - b[i, m]).

    X [C, C] fp32, F [C, BM] fp32, Fn = (F * exp(r - b)) in DT (factored operand), b [C, BM]; eb unused
    (kept for the callers' uniform signature).
    """
    o = tl.arange(0, C)
    Xc = tl.where(o[:, None] > o[None, :], X, 0.)
    if regime == FACTORED:
        Y = rel_exp(b, C) * tl.dot(Xc.to(DT), Fn, input_precision=PREC)
    elif regime == BLOCKED:
        Y = tl.full(F.shape, 0., tl.float32)
        for s in tl.static_range(C // SUB):
            Xs = tl.where((o[None, :] // SUB) == s, Xc, 0.)
            Y += block_exp(b, o, s) * tl.dot(Xs.to(DT), Fn, input_precision=PREC)
    else:
        Y = tl.full(F.shape, 0., tl.float32)
        for j in range(C):
            xj = _col(Xc, o, j)
            fj = _row(F, o, j)
            bj = _row(b, o, j)
            Y += xj[:, None] * (fj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.)))
    return Y


@triton.jit
def op1t(X, F, b, eb, enb, regime, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Y[i, m] = sum_{t>i} X[t, i] F[t, m] exp(b[t, m] - b[i, m]).  X [C, C], F [C, BM] fp32;
    enb = exp(r - b) (chunk_gates), eb unused."""
    o = tl.arange(0, C)
    Xc = tl.where(o[:, None] > o[None, :], X, 0.)
    if regime == FACTORED:
        Y = enb * tl.dot(tl.trans(Xc).to(DT), (F * rel_exp(b, C)).to(DT), input_precision=PREC)
    elif regime == BLOCKED:
        Xt = tl.trans(Xc).to(DT)
        Y = tl.full(F.shape, 0., tl.float32)
        for s in tl.static_range(C // SUB):
            Ys = tl.dot(Xt, (F * block_exp(b, o, s)).to(DT), input_precision=PREC)
            Y += tl.where((o[:, None] // SUB) == s, Ys, 0.)
        Y = enb * Y
    else:
        Y = tl.full(F.shape, 0., tl.float32)
        for j in range(C):
            xj = _col(Xc, o, j)
            bj = _row(b, o, j)
            yj = vsum(xj[:, None] * F * tl.exp(tl.minimum(b - bj[None, :], 0.)), 0)
            Y = tl.where(o[:, None] == j, yj[None, :], Y)
    return Y


@triton.jit
def op2(P, F, Fn, b, eb, regime, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """X[t, i] = sum_m P[t, m] F[i, m] exp(b[t, m] - b[i, m]) for i <= t, else 0.

    P, F [C, BM] fp32; Fn = (F * exp(r - b)) in DT; eb unused. Returns [C, C] fp32.
    """
    o = tl.arange(0, C)
    causal = o[:, None] >= o[None, :]
    if regime == FACTORED:
        X = tl.dot((P * rel_exp(b, C)).to(DT), tl.trans(Fn), input_precision=PREC)
        X = tl.where(causal, X, 0.)
    elif regime == BLOCKED:
        Fnt = tl.trans(Fn)
        X = tl.full([C, C], 0., tl.float32)
        for s in tl.static_range(C // SUB):
            Xs = tl.dot((P * block_exp(b, o, s)).to(DT), Fnt, input_precision=PREC)
            X += tl.where((o[None, :] // SUB) == s, Xs, 0.)
        X = tl.where(causal, X, 0.)
    else:
        X = tl.full([C, C], 0., tl.float32)
        for j in range(C):
            fj = _row(F, o, j)
            bj = _row(b, o, j)
            xj = vsum(P * (fj[None, :] * tl.exp(tl.minimum(b - bj[None, :], 0.))), 1)
            X = tl.where((o[None, :] == j) & causal, xj[:, None], X)
    return X


@triton.jit
def _excl_combine(a1, b1, a2, b2):
    return a1 + b1 + a2, b2


@triton.jit
def exclusive_cumsum(x):
    """sum_{i<t} x[i] along axis 0, by additions only (inclusive cumsum minus x[t] would cancel
    catastrophically when x[t] dominates the sum, e.g. a token's own undecayed state write).

    The interpreter runs a scan with a custom combine one element at a time (slow); there the
    rows are shifted down by one with an exact 0/1 product and summed by the built-in cumsum."""
    if INTERP:
        o = tl.arange(0, x.shape[0])
        shift = tl.where(o[:, None] == o[None, :] + 1, 1., 0.)
        return vcumsum(tl.dot(shift, x.to(tl.float32), input_precision="ieee"), False)
    else:
        return tl.associative_scan((tl.full(x.shape, 0., x.dtype), x), 0, _excl_combine)[0]


@triton.jit
def masked_softmax(Z, m_m):
    """Row softmax over the slots of Z [C, BM] (fp32); padded slots get probability 0."""
    Zm = tl.where(m_m[None, :], Z, float("-inf"))
    mx = vmax(Zm, 1)
    e = tl.exp(Zm - mx[:, None])
    return e / vsum(e, 1)[:, None]


@triton.jit
def load_state(h0k, h0v, nh, o_k, o_v, o_m, m_k, m_v, m_m, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, USE_H0: tl.constexpr):
    """The decoding kernels' fp32 state of (sequence, kv head) ``nh``: slot keys [BK, BM] and the value
    block ``o_v`` of the slot values [BM, BV] (zeros without USE_H0), with their offsets and masks
    (st_k, st_v, m_km, m_mv) for storing the final state where it was read."""
    st_k = nh.to(tl.int64) * (K * M) + o_k[:, None] * M + o_m[None, :]
    st_v = nh.to(tl.int64) * (M * V) + o_m[:, None] * V + o_v[None, :]
    m_km, m_mv = m_k[:, None] & m_m[None, :], m_m[:, None] & m_v[None, :]
    if USE_H0:
        hk = tl.load(h0k + st_k, mask=m_km, other=0.).to(tl.float32)
        hv = tl.load(h0v + st_v, mask=m_mv, other=0.).to(tl.float32)
    else:
        hk = tl.full([BK, BM], 0., tl.float32)
        hv = tl.full([BM, BV], 0., tl.float32)
    return hk, hv, st_k, st_v, m_km, m_mv
