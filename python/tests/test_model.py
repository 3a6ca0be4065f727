import math

import pytest
import torch

from cla_train.model import (
    ClaConfig,
    ClaForCausalLM,
    apply_rope,
    pattern_name,
    reference_causal_attention,
    rope_cos_sin,
    sharing_map,
    validate_sharing_map,
)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def small_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=4, head_dim=8, max_position_embeddings=64)
    base.update(kw)
    sharing = base.pop("sharing", "none")
    base["kv_source_layers"] = sharing_map(sharing, base["num_hidden_layers"])
    return ClaConfig(**base)


VARIANTS = {
    "MHA": dict(num_key_value_heads=4),
    "GQA": dict(num_key_value_heads=2),
    "MQA": dict(num_key_value_heads=1),
    "CLA2": dict(num_key_value_heads=1, sharing="cla2", kv_input_layernorm=True),
    "CLA3": dict(num_key_value_heads=2, sharing="cla3", kv_input_layernorm=True, num_hidden_layers=7),
    "CLA2-untied-nokvnorm": dict(num_key_value_heads=1, sharing="cla2", tie_word_embeddings=False),
    "wide-q": dict(num_key_value_heads=1, num_attention_heads=8, head_dim=8),  # q dim 64 != hidden 32
}


def test_sharing_patterns_follow_the_paper():
    assert sharing_map("none", 4) == [0, 1, 2, 3]
    assert sharing_map("cla2", 6) == [0, 0, 2, 2, 4, 4]
    assert sharing_map("cla2", 5) == [0, 1, 1, 3, 3]  # short group first
    # The paper's example: 10 layers, CLA3 -> {0}, {1,2,3}, {4,5,6}, {7,8,9}
    assert sharing_map("cla3", 10) == [0, 1, 1, 1, 4, 4, 4, 7, 7, 7]
    assert sharing_map("cla3", 8) == [0, 0, 2, 2, 2, 5, 5, 5]
    assert sharing_map("CLA4", 20).count(0) == 4
    assert pattern_name([0, 0, 2, 2]) == "cla2"
    assert pattern_name([0, 1, 2]) == "none"
    assert pattern_name([0, 0, 0, 3]) == "custom"
    with pytest.raises(ValueError):
        sharing_map("keepends", 4)


@pytest.mark.parametrize("bad", [[1, 1], [0, 2, 2], [0, 0, 1], []])
def test_bad_maps_are_rejected(bad):
    with pytest.raises(ValueError):
        validate_sharing_map(bad)


def test_paper_kv_bytes_per_token():
    # Table 1 rows (20 layers, d_head 128): MHA 163840, MQA-CLA2 5120, MQA-CLA3 3584.
    def cfg(heads, kv, hd, sharing):
        return ClaConfig(hidden_size=2048, num_hidden_layers=20, num_attention_heads=heads, num_key_value_heads=kv,
                         head_dim=hd, kv_source_layers=sharing_map(sharing, 20))

    assert cfg(16, 16, 128, "none").kv_bytes_per_token() == 163840
    assert cfg(16, 1, 128, "cla2").kv_bytes_per_token() == 5120
    assert cfg(16, 1, 128, "cla3").kv_bytes_per_token() == 3584
    assert cfg(32, 1, 64, "none").kv_bytes_per_token() == 5120


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_and_parameter_count(variant):
    cfg = small_cfg(**VARIANTS[variant])
    model = ClaForCausalLM(cfg)
    sd = model.state_dict()
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        assert sd[p + "self_attn.q_proj.weight"].shape == (q, cfg.hidden_size)
        assert sd[p + "self_attn.o_proj.weight"].shape == (cfg.hidden_size, q)
        if cfg.is_producer(i):
            assert sd[p + "self_attn.k_proj.weight"].shape == (kv, cfg.hidden_size)
            assert sd[p + "self_attn.v_proj.weight"].shape == (kv, cfg.hidden_size)
            assert (p + "kv_input_layernorm.weight" in sd) == cfg.kv_input_layernorm
        else:
            assert not any(k.startswith(p + "self_attn.k_proj") or k.startswith(p + "self_attn.v_proj") for k in sd)
            assert p + "kv_input_layernorm.weight" not in sd
    assert ("lm_head.weight" in sd) == (not cfg.tie_word_embeddings)
    assert model.num_parameters() == cfg.num_parameters()
    # Independent formula for the K/V parameters only.
    n_kv = sum(v.numel() for k, v in sd.items() if "k_proj" in k or "v_proj" in k)
    assert n_kv == cfg.num_kv_layers * 2 * cfg.hidden_size * kv
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    assert model(x).shape == (2, 11, cfg.vocab_size)
    assert model(x[0]).shape == (11, cfg.vocab_size)


@pytest.mark.parametrize("variant", ["MHA", "GQA", "CLA2", "CLA3"])
def test_causal(variant, device):
    torch.manual_seed(0)
    cfg = small_cfg(**VARIANTS[variant])
    model = ClaForCausalLM(cfg).to(device).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[0, :10], b[0, :10], rtol=1e-5, atol=1e-5)
    assert (a[0, 10:] - b[0, 10:]).abs().max() > 1e-3


def manual_forward(model: ClaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """An independent forward pass from the raw tensors, written against the format spec:
    consumer layer i attends with its own Q over the K/V computed by kv_source_layers[i]."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    t = ids.shape[0]
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * g

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [heads, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    kv_store = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(t, nh, hd).transpose(0, 1))
        src = cfg.kv_source_layers[i]
        if src == i:
            hk = rms(x, w[p + "kv_input_layernorm.weight"]) if cfg.kv_input_layernorm else h
            k = rope((hk @ w[p + "self_attn.k_proj.weight"].T).view(t, nkv, hd).transpose(0, 1))
            v = (hk @ w[p + "self_attn.v_proj.weight"].T).view(t, nkv, hd).transpose(0, 1)
            kv_store[i] = (k, v)
        k, v = kv_store[src]
        out = torch.zeros(nh, t, hd, dtype=torch.float64)
        for head in range(nh):
            kvh = head // (nh // nkv)
            s = q[head] @ k[kvh].T / math.sqrt(hd)
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            out[head] = s.softmax(-1) @ v[kvh]
        x = x + out.transpose(0, 1).reshape(t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        h2 = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h2 @ w[p + "mlp.gate_proj.weight"].T
        u = h2 @ w[p + "mlp.up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head_w = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head_w.T


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_manual_forward(variant):
    torch.manual_seed(1)
    cfg = small_cfg(**VARIANTS[variant])
    model = ClaForCausalLM(cfg).eval()
    # Perturb norm scales so that a swapped norm would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, cfg.vocab_size, (13,))
    with torch.no_grad():
        got = model(ids).double()
    torch.testing.assert_close(got, manual_forward(model, ids), rtol=1e-4, atol=1e-4)


def test_consumer_uses_its_producers_kv():
    """In a CLA2 model, changing the producer's K/V projection changes the consumer's
    output; a consumer has no K/V of its own to change; and a model whose consumer reads
    its producer's K/V differs from one where the consumer would read its own input."""
    torch.manual_seed(2)
    cfg = small_cfg(num_hidden_layers=2, num_key_value_heads=1, sharing="cla2", kv_input_layernorm=True)
    model = ClaForCausalLM(cfg).eval()
    layer0, layer1 = model.model.layers
    assert not hasattr(layer1.self_attn, "k_proj")
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    captured = {}

    def keep(key, pick):
        def hook(module, inp, out):  # returns None: the output is left unchanged
            captured.setdefault(key, pick(inp, out))

        return hook

    layer1.self_attn.register_forward_hook(keep("out", lambda inp, out: out))
    layer1.register_forward_hook(keep("x_in", lambda inp, out: inp[0]))
    layer0.self_attn.register_forward_hook(keep("kv0", lambda inp, out: inp[1]))
    with torch.no_grad():
        model(ids)
    # Recompute layer 1's attention by hand from layer 0's K/V (which layer 0 computed from
    # ITS input with ITS kv_input_layernorm), using layer 1's own Q.
    x1 = captured["x_in"]
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, torch.arange(9))
    h = layer1.input_layernorm(x1)
    q = apply_rope(layer1.self_attn.q_proj(h).view(1, 9, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2), cos, sin)
    k0, v0 = captured["kv0"]
    ref = reference_causal_attention(q, k0, v0).transpose(1, 2).reshape(1, 9, -1)
    with torch.no_grad():
        torch.testing.assert_close(captured["out"], layer1.self_attn.o_proj(ref), rtol=1e-5, atol=1e-5)
    # And layer 0's K/V really is its own projection of its own (kv-normed) input.
    x0 = model.model.embed_tokens(ids)
    k_ref, v_ref = layer0.self_attn.project_kv(layer0.kv_input_layernorm(x0), cos, sin)
    torch.testing.assert_close(k0, k_ref)
    torch.testing.assert_close(v0, v_ref)
    # Perturbing the producer's v_proj changes layer 1's attention output.
    with torch.no_grad():
        base = model(ids)
        layer0.self_attn.v_proj.weight.add_(0.5)
        assert (model(ids) - base).abs().max() > 1e-3


def test_kv_input_layernorm_feeds_only_kv():
    torch.manual_seed(3)
    cfg = small_cfg(num_hidden_layers=2, num_key_value_heads=1, sharing="cla2", kv_input_layernorm=True)
    model = ClaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        a = model(ids)
        model.model.layers[0].kv_input_layernorm.weight.mul_(2.0)
        b = model(ids)
    assert (a - b).abs().max() > 1e-4


def test_sdpa_matches_reference_attention(device):
    torch.manual_seed(4)
    from cla_train.model import causal_attention

    q = torch.randn(2, 4, 10, 8, device=device)
    k = torch.randn(2, 2, 10, 8, device=device)
    v = torch.randn(2, 2, 10, 8, device=device)
    torch.testing.assert_close(causal_attention(q, k, v), reference_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_config_json_round_trip(tmp_path):
    cfg = small_cfg(num_key_value_heads=1, sharing="cla3", kv_input_layernorm=True, tie_word_embeddings=False)
    cfg.save(tmp_path / "config.json")
    import json

    d = json.loads((tmp_path / "config.json").read_text())
    assert d["kv_source_layers"] == [0, 0, 0, 3, 3, 3]
    assert d["num_key_value_heads"] == 1 and d["head_dim"] == 8
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert key in d
    back = ClaConfig.load(tmp_path / "config.json")
    assert back.to_dict() == cfg.to_dict()
    # A plain HF Llama config (no kv_source_layers, no head_dim) loads as all-producers.
    d2 = {k: d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
    c2 = ClaConfig.from_dict(d2)
    assert c2.kv_source_layers == list(range(6)) and c2.head_dim == 8
