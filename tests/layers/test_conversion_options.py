"""The conversion options that start a layer close to its teacher, each against a hand-written
reference: feature maps (fixed and learnable), gates pooled from the keys, f_proj initialised from
the keys, and the window hybrid (exact softmax over the last W tokens + GSA for the older ones)."""
import math

import pytest
import torch
import torch.nn.functional as F

from t2r.conversion_limits import FEATURE_MAPS
from t2r.kernels.gsa import naive_recurrent_gsa
from t2r.layers.attention import AttentionContext
from t2r.layers.gsa import GatedSlotAttention
from t2r.layers.rotary import RotaryEmbedding, apply_rotary
from t2r.layers.window import window_attention
from t2r.models import T2RConfig
from tests.conftest import converted
from tests.kernels.gsa_inputs import rel_err

B, T, HQ, H, D, HID = 2, 23, 4, 2, 12, 48


def _layer(**opts):
    c = T2RConfig(hidden_size=HID, num_attention_heads=HQ, num_key_value_heads=H, head_dim=D, num_hidden_layers=1,
                  intermediate_size=64, vocab_size=10, **{"num_slots": 6, **opts})
    layer = GatedSlotAttention(c, 0).eval()
    layer.init_new_parameters(torch.Generator().manual_seed(0), "random")
    with torch.no_grad():  # move the learnable parts off their initial values
        for name, p in layer.named_parameters():
            if name.startswith(("q_map", "k_map", "window_mix")):
                p.add_(0.3 * torch.randn_like(p))
    return c, layer


def _ctx(c, x, positions=None):
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1) if positions is None else positions
    cos, sin = RotaryEmbedding(c)(pos, x.dtype)
    return AttentionContext(cos=cos, sin=sin, positions=pos)


def _phi(kind, x, fm):
    if kind == "softmax":
        return x.softmax(-1)
    if kind == "identity":
        return x
    z = torch.einsum("bthd,hde->bthe", x, fm.weight)
    return z if kind == "linear" else torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)


def _reference_inputs(layer, c, x, ctx):
    q = layer.q_proj(x).view(B, T, HQ, D)
    k = layer.k_proj(x).view(B, T, H, D)
    v = layer.v_proj(x).view(B, T, H, D)
    if c.gate_source == "key":  # average of each run of D / M key coordinates
        logits = k.view(B, T, H, c.num_slots, D // c.num_slots).mean(-1)
    else:
        logits = layer.f_proj(x).view(B, T, H, c.num_slots)
    g = F.logsigmoid(logits) / c.gate_logit_normalizer
    qr, kr = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
    qg, kg = (qr, kr) if c.use_rope else (q, k)
    qf, kf = _phi(c.feature_map, qg, layer.q_map), _phi(c.feature_map, kg, layer.k_map)
    return qf, kf, v, 1 - g.exp(), g, qr, kr


OPTIONS = [
    dict(feature_map="softmax"),
    dict(feature_map="linear", use_rope=True),
    dict(feature_map="hedgehog", gate_source="key"),
    dict(feature_map="identity", gate_source="key", use_rope=True, gsa_scale=0.7),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_feature_maps_and_key_gates_compute_the_contract(opts):
    c, layer = _layer(output_norm=False, v_activation="identity", **opts)
    x = torch.randn(B, T, HID)
    ctx = _ctx(c, x)
    with torch.no_grad():
        out = layer(x, ctx)
        qf, kf, v, s, g, _, _ = _reference_inputs(layer, c, x, ctx)
        o, _ = naive_recurrent_gsa(qf, kf, v, s, g, scale=c.gsa_logit_scale)
        ref = layer.o_proj(o.reshape(B, T, -1))
    assert rel_err(out, ref) < 1e-5
    assert (layer.f_proj is None) == (c.gate_source == "key")


def test_f_proj_starts_as_the_key_gate():
    """f_proj_init=key: a new f_proj gives the same gates as pooling the key projection."""
    c, layer = _layer(num_slots=6)
    layer.init_new_parameters(None, "key")
    x = torch.randn(B, T, HID)
    k = layer.k_proj(x).view(B, T, H, D) - layer.k_proj.bias.view(H, D) if layer.k_proj.bias is not None \
        else layer.k_proj(x).view(B, T, H, D)
    pooled = k.view(B, T, H, 6, 2).mean(-1)
    assert rel_err(layer.f_proj(x).view(B, T, H, 6), pooled) < 1e-5


def _dense_window(q, k, v, W, scale, valid=None):
    """Reference: every query against every key, masked to (t - W, t]."""
    T_ = q.shape[1]
    kk = k.repeat_interleave(q.shape[2] // k.shape[2], 2)
    vv = v.repeat_interleave(q.shape[2] // k.shape[2], 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    t = torch.arange(T_)[:, None]
    j = torch.arange(T_)[None]
    allowed = ((j <= t) & (j > t - W))[None, None].expand(q.shape[0], 1, T_, T_)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    allowed = allowed | (j == t)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), vv), torch.logsumexp(s, -1).transpose(1, 2)


@pytest.mark.parametrize("W,T_", [(4, 23), (8, 8), (8, 5), (5, 1)])
def test_block_window_attention_matches_dense(W, T_):
    q, k, v = torch.randn(2, T_, 4, 8), torch.randn(2, T_, 2, 8), torch.randn(2, T_, 2, 8)
    valid = torch.ones(2, T_, dtype=torch.bool)
    valid[1, : T_ // 2] = False  # left padding
    o, lse = window_attention(q, k, v, W, 0.4, key_valid=valid)
    ref_o, ref_lse = _dense_window(q, k, v, W, 0.4, valid)
    assert rel_err(o, ref_o) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


def test_block_window_attention_with_cached_positions():
    """P cached keys before the queries (decoding): the same as the last T rows of the whole."""
    W = 6
    q, k, v = torch.randn(1, 15, 4, 8), torch.randn(1, 15, 2, 8), torch.randn(1, 15, 2, 8)
    ref_o, ref_lse = _dense_window(q, k, v, W, 0.3)
    o, lse = window_attention(q[:, -4:], k[:, -10:], v[:, -10:], W, 0.3)  # 6 cached + 4 new
    assert rel_err(o, ref_o[:, -4:]) < 1e-5 and rel_err(lse, ref_lse[:, -4:]) < 1e-5


@pytest.mark.parametrize("opts", [dict(feature_map="identity", use_rope=True, gate_source="key"),
                                  dict(feature_map="linear", use_rope=False)], ids=["identity-key", "linear-fproj"])
def test_window_hybrid_layer_matches_its_formula(opts):
    """o_t = w o_window + (1 - w) o_gsa, o_gsa read from the state after t - W tokens,
    w = sigmoid(lse_window - theta - log(t - W + 1)): checked token by token."""
    W = 5
    c, layer = _layer(window_size=W, output_norm=False, v_activation="identity", **opts)
    x = torch.randn(B, T, HID)
    ctx = _ctx(c, x)
    with torch.no_grad():
        out = layer(x, ctx)
        qf, kf, v, s, g, qr, kr = _reference_inputs(layer, c, x, ctx)
        o_w, lse = _dense_window(qr, kr, v, W, D ** -0.5)
        rows = []
        for t in range(T):
            if t < W:
                rows.append(o_w[:, t])
                continue
            _, (hk, hv) = naive_recurrent_gsa(qf[:, :t - W + 1], kf[:, :t - W + 1], v[:, :t - W + 1],
                                              s[:, :t - W + 1], g[:, :t - W + 1], output_final_state=True)
            qh = qf[:, t].view(B, H, HQ // H, D)
            p = (c.gsa_logit_scale * torch.einsum("bhgk,bhkm->bhgm", qh, hk)).softmax(-1)
            o_g = torch.einsum("bhgm,bhmv->bhgv", p, hv).reshape(B, HQ, D)
            w = torch.sigmoid(lse[:, t] - layer.window_mix.weight - math.log(t - W + 1))[..., None]
            rows.append(w * o_w[:, t] + (1 - w) * o_g)
        ref = layer.o_proj(torch.stack(rows, 1).reshape(B, T, -1))
    assert rel_err(out, ref) < 1e-5


def test_window_branches_can_be_switched_off_at_inference():
    _, model, _ = converted("llama", window_size=4, feature_map="identity", use_rope=True, output_norm=False,
                            v_activation="identity")
    ids = torch.randint(2, 258, (1, 30))
    with torch.no_grad():
        both = model(ids).logits
        with model.window_branches(gsa=False):
            window_only = model(ids).logits
        with model.window_branches(window=False):
            gsa_only = model(ids).logits
        again = model(ids).logits
    assert torch.equal(both, again)
    assert rel_err(window_only, both) > 1e-3 and rel_err(gsa_only, both) > 1e-3
    # the first W tokens have nothing older than the window: the GSA branch cannot change them
    assert rel_err(window_only[:, :4], both[:, :4]) < 1e-6


@pytest.mark.parametrize("opts", [dict(feature_map="linear"), dict(feature_map="hedgehog", window_size=4)])
def test_learnable_feature_maps_start_where_identity_would(opts):
    """linear starts as the identity map; both learnable maps are new parameters of the conversion."""
    from t2r.convert import new_parameter_names

    _, model, _ = converted("llama", **opts)
    names = {n.split(".self_attn.")[1] for n in new_parameter_names(model)}
    assert {"q_map.weight", "k_map.weight"} <= names
    assert ("window_mix.weight" in names) == bool(opts.get("window_size"))
    w = model.model.layers[0].self_attn.q_map.weight
    if opts["feature_map"] == "linear":
        assert torch.equal(w, torch.eye(w.shape[1]).expand_as(w))


@pytest.mark.parametrize("kind", FEATURE_MAPS)
def test_every_feature_map_the_options_offer_runs(kind):
    """Each --feature-map choice builds a layer whose forward gives finite outputs of the input's shape."""
    c, layer = _layer(feature_map=kind)
    x = torch.randn(B, T, HID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x, _ctx(c, x))
    assert out.shape == x.shape and torch.isfinite(out).all()
