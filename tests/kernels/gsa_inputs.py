"""Random GSA operator inputs shared by the kernel tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(B, T, HQ, H, K=8, V=8, M=6, dtype=torch.float32, gate="normal", seed=0,
                device="cpu", initial_state=False, N=None):
    """q, k, v, s, g (+ optional fp32 initial state for N sequences) like the GSA layer makes them.

    gate: 'normal' (alpha around 0.9, s = 1 - alpha as in the layer), 'near0' (alpha ~ 1e-13:
    g ~ -30 per step, forgets at once), 'near1' (alpha ~ 1 - 1e-6: g ~ -1e-6, never forgets), 'strong'
    (g ~ -1 per step: what converted models' fast-forgetting slots do), 'steep' (g ~ -4 per step: a chunk
    of 64 decays by ~e^-256, a sub-block of 16 by ~e^-64).
    With extreme gates s is drawn on its own: tied to alpha it would make every slot equal.
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(B, T, HQ, K), rnd(B, T, H, K), rnd(B, T, H, V)
    logits = rnd(B, T, H, M)
    if gate == "normal":
        g = F.logsigmoid(logits) / 8
    elif gate == "near0":
        g = -30.0 + 0.1 * logits.tanh()
    elif gate == "near1":
        g = -1e-6 * torch.sigmoid(logits)
    elif gate == "strong":  # alpha ~ 0.37: a chunk of 64 decays by ~e^-64, past THRESH from its start
        g = -1.0 + 0.2 * logits.tanh()
    elif gate == "steep":  # alpha ~ 0.02: past THRESH from a chunk's middle, within it from a sub-block's
        g = -4.0 + 0.5 * logits.tanh()
    else:
        raise ValueError(gate)
    s = -torch.expm1(g) if gate == "normal" else torch.sigmoid(rnd(B, T, H, M))
    out = [x.to(device=device, dtype=dtype) for x in (q, k, v, s, g)]
    if initial_state:
        n = B if N is None else N
        out.append((rnd(n, H, K, M).float().to(device), rnd(n, H, M, V).float().to(device)))
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64; inf when x has a NaN or inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
