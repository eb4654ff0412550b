"""GatedSlotAttention against the layer contract (gsa.md section 2), written out by hand."""
import pytest
import torch
import torch.nn.functional as F

from t2r.layers.attention import AttentionContext
from t2r.layers.gsa import GatedSlotAttention, slot_gates
from t2r.layers.rotary import RotaryEmbedding, apply_rotary
from t2r.models import T2RConfig
from t2r.kernels.gsa import naive_recurrent_gsa
from tests.kernels.gsa_inputs import rel_err

PHI = {"swish": F.silu, "relu": F.relu, "identity": lambda x: x, "elu1": lambda x: F.elu(x) + 1}


def test_gates_are_logsigmoid_over_tau_and_tied_writes():
    x = torch.linspace(-40, 40, 101)
    s, g = slot_gates(x, 8.0)
    assert torch.allclose(g, F.logsigmoid(x) / 8) and (g <= 0).all()
    assert torch.allclose(s, 1 - g.exp(), rtol=0, atol=1e-6) and ((s >= 0) & (s < 1)).all()


OPTIONS = [
    dict(),  # the paper: swish, no RoPE, scale 1, silu on v, output norm
    dict(feature_map="relu", use_rope=True, v_activation="identity"),
    dict(feature_map="identity", output_norm=False, gsa_scale=0.3, num_slots=5, gate_logit_normalizer=2.0),
    dict(feature_map="elu1", qkv_bias=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
def test_layer_computes_the_contract(opts):
    c = T2RConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=10, **{"num_slots": 7, **opts})
    layer = GatedSlotAttention(c, 0).eval()
    if layer.g_norm is not None:
        torch.nn.init.normal_(layer.g_norm.weight)
    x = torch.randn(2, 13, 48)
    pos = torch.arange(13).expand(2, 13)
    cos, sin = RotaryEmbedding(c)(pos, x.dtype)
    with torch.no_grad():
        out = layer(x, AttentionContext(cos=cos, sin=sin))
        q = layer.q_proj(x).view(2, 13, 4, 12)
        k = layer.k_proj(x).view(2, 13, 2, 12)
        v = layer.v_proj(x).view(2, 13, 2, 12)
        if c.use_rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        phi = PHI[c.feature_map]
        q, k = phi(q), phi(k)
        v = F.silu(v) if c.v_activation == "silu" else v
        g = F.logsigmoid(layer.f_proj(x).view(2, 13, 2, c.num_slots)) / c.gate_logit_normalizer
        s = 1 - g.exp()
        scale = c.gsa_scale if c.gsa_scale else (1.0 if c.feature_map == "swish" else 12 ** -0.5)
        o, _ = naive_recurrent_gsa(q, k, v, s, g, scale=scale)
        if c.output_norm:
            o = F.silu(o)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + c.gsa_norm_eps) * layer.g_norm.weight
        ref = layer.o_proj(o.reshape(2, 13, 48))
    assert rel_err(out, ref) < 1e-5
    assert layer.f_proj.weight.shape == (2 * c.num_slots, 48)
    assert (layer.g_norm is None) == (not c.output_norm)
