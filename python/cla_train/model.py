"""A Llama-style decoder with Cross-Layer Attention (CLA), in plain PyTorch.

Paper: Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
Attention" (arXiv 2405.12981), section 2. Every layer has its own queries. A *producer*
layer also projects keys and values; a *consumer* layer has no K/V projections and
attends with its own queries over the keys and values that an earlier producer layer
computed in the same forward pass. Which layer reads which is one list,
``kv_source_layers``: entry ``i`` is the layer whose K/V layer ``i`` attends to
(``kv_source_layers[i] == i`` for a producer).

Everything else is the Hugging Face Llama architecture, written out so that a reader can
check it line by line:

* RMSNorm: ``x * rsqrt(mean(x^2) + eps) * w``, computed in float32.
* RoPE in the ``rotate_half`` convention: ``inv_freq = theta^(-arange(0, hd, 2) / hd)``,
  cos/sin over the full head_dim via ``cat(freqs, freqs)``; keys are stored after RoPE.
* Causal attention, GQA by repeating each K/V head for ``n_heads / n_kv_heads`` query
  heads (query head ``h`` uses K/V head ``h // (n_heads / n_kv_heads)``), scale
  ``1 / sqrt(head_dim)``.
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``, pre-norm residual blocks, final norm,
  LM head (optionally tied to the embedding). No biases anywhere.
* Optional ``kv_input_layernorm`` on producers (the paper's separate norm scale for the
  K/V projection): K/V are computed from ``RMSNorm(x)`` with that scale, Q from
  ``input_layernorm``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# The layer -> K/V source map
# --------------------------------------------------------------------------------------


def sharing_map(pattern: str, num_layers: int) -> list[int]:
    """Builds ``kv_source_layers`` for a named pattern.

    * ``none``: every layer produces its own K/V (a plain transformer).
    * ``claN`` (``cla2``, ``cla3``, ...): the paper's rule. Consecutive groups of N layers
      share the K/V of the group's first layer; when N does not divide the layer count the
      SHORT group comes FIRST. 10 layers, CLA3: {0}, {1,2,3}, {4,5,6}, {7,8,9}.
    """
    if num_layers < 1:
        raise ValueError("a model needs at least one layer")
    name = pattern.strip().lower()
    if name in ("none", "cla1"):
        return list(range(num_layers))
    m = re.fullmatch(r"cla(\d+)", name)
    if not m:
        raise ValueError(f"unknown sharing pattern {pattern!r}: use 'none' or 'claN'")
    n = int(m.group(1))
    if n < 1:
        raise ValueError("the sharing factor must be at least 1")
    short = num_layers % n  # size of the short first group (0: all groups are full)
    sources = []
    for i in range(num_layers):
        if i < short:
            sources.append(0)
        else:
            sources.append(short + (i - short) // n * n)
    return sources


def validate_sharing_map(sources: list[int]) -> None:
    """Raises ValueError unless the map is well formed: layer 0 produces, every entry points
    at itself or an earlier layer, and every source is itself a producer (no chains)."""
    if not sources:
        raise ValueError("kv_source_layers is empty")
    for i, s in enumerate(sources):
        if not isinstance(s, int) or s < 0 or s > i:
            raise ValueError(
                f"kv_source_layers[{i}] = {s!r}: must be an integer in 0..={i} "
                "(a layer can only use its own or an earlier layer's K/V)"
            )
        if sources[s] != s:
            raise ValueError(
                f"kv_source_layers[{i}] = {s}, but layer {s} is itself a consumer "
                f"(kv_source_layers[{s}] = {sources[s]}); point at the producer directly"
            )


def pattern_name(sources: list[int]) -> str:
    """The name of a map if it is one of the named patterns, else 'custom'."""
    n = len(sources)
    for k in range(1, n + 1):
        if sharing_map(f"cla{k}", n) == sources:
            return "none" if k == 1 else f"cla{k}"
    return "custom"


# --------------------------------------------------------------------------------------
# Config (the shared config.json format)
# --------------------------------------------------------------------------------------


@dataclass
class ClaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Entry i = the layer whose K/V layer i attends to. None means every layer produces.
    kv_source_layers: Optional[list[int]] = None
    # Producers get their own RMSNorm scale in front of the K/V projections.
    kv_input_layernorm: bool = False
    initializer_range: float = 0.02
    # Free-form provenance (e.g. the training recipe); written to config.json as is.
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kv_source_layers is None:
            self.kv_source_layers = list(range(self.num_hidden_layers))
        self.kv_source_layers = [int(s) for s in self.kv_source_layers]
        self.validate()

    def validate(self) -> None:
        if len(self.kv_source_layers) != self.num_hidden_layers:
            raise ValueError(
                f"kv_source_layers has {len(self.kv_source_layers)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        validate_sharing_map(self.kv_source_layers)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    # -- derived quantities --------------------------------------------------------------

    def is_producer(self, layer: int) -> bool:
        return self.kv_source_layers[layer] == layer

    @property
    def producer_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_producer(i)]

    @property
    def num_kv_layers(self) -> int:
        return len(self.producer_layers)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Cache footprint per token: K and V, per KV head, per producer layer."""
        return 2 * self.num_key_value_heads * self.head_dim * self.num_kv_layers * bytes_per_element

    def num_parameters(self) -> int:
        """Closed-form parameter count (the tests check it against the module)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        total = v * d + d  # embedding + final norm
        if not self.tie_word_embeddings:
            total += v * d
        for i in range(self.num_hidden_layers):
            total += 2 * d  # input_layernorm, post_attention_layernorm
            total += d * q + q * d  # q_proj, o_proj
            total += 3 * d * f  # gate, up, down
            if self.is_producer(i):
                total += 2 * d * kv  # k_proj, v_proj
                if self.kv_input_layernorm:
                    total += d
        return total

    # -- config.json ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        plain = self.num_kv_layers == self.num_hidden_layers and not self.kv_input_layernorm
        out = {
            # A plain Llama (no sharing, no extra norm) is loadable by HF transformers as is;
            # a CLA model is not (its consumer layers have no k/v weights), so it gets its own
            # architecture name and model_type.
            "architectures": ["LlamaForCausalLM" if plain else "ClaLlamaForCausalLM"],
            "model_type": "llama" if plain else "cla_llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "kv_source_layers": list(self.kv_source_layers),
            "kv_input_layernorm": self.kv_input_layernorm,
            "cla_pattern": pattern_name(self.kv_source_layers),
            "initializer_range": self.initializer_range,
            "torch_dtype": "float32",
        }
        if self.extra:
            out["cla_train"] = self.extra
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ClaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k != "extra"}
        if "head_dim" not in d or d["head_dim"] is None:
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if "num_key_value_heads" not in d or d["num_key_value_heads"] is None:
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        kwargs["extra"] = d.get("cla_train", {})
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ClaConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(head_dim: int, theta: float, positions: torch.Tensor):
    """cos, sin of shape [T, head_dim] in float32 (HF Llama's default RoPE)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention. q: [B, H, T, D]; k, v: [B, KVH, T, D] with KVH dividing H.

    Query head h reads K/V head h // (H / KVH), i.e. each K/V head is repeated for a
    contiguous group of query heads (HF's repeat_kv)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]))


def reference_causal_attention(q, k, v):
    """The same attention written out with an explicit mask (used by the tests)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ClaConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.is_producer = cfg.is_producer(layer)
        d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)
        if self.is_producer:
            self.k_proj = nn.Linear(d, kv, bias=False)
            self.v_proj = nn.Linear(d, kv, bias=False)

    def project_kv(self, h_kv: torch.Tensor, cos, sin):
        """Producer only: K (after RoPE) and V, each [B, KVH, T, D]."""
        b, t, _ = h_kv.shape
        k = self.k_proj(h_kv).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h_kv).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, h_q: torch.Tensor, kv, cos, sin) -> torch.Tensor:
        b, t, _ = h_q.shape
        q = self.q_proj(h_q).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = kv
        out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ClaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ClaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kv_source = cfg.kv_source_layers[layer]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_producer(layer) and cfg.kv_input_layernorm:
            self.kv_input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        else:
            self.kv_input_layernorm = None
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, shared_kv: dict, cos, sin):
        h = self.input_layernorm(x)
        if self.self_attn.is_producer:
            h_kv = self.kv_input_layernorm(x) if self.kv_input_layernorm is not None else h
            shared_kv[self.layer] = self.self_attn.project_kv(h_kv, cos, sin)
        # A consumer reads the K/V its producer stored earlier in this same forward pass.
        kv = shared_kv[self.kv_source]
        x = x + self.self_attn(h, kv, cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaModel(nn.Module):
    def __init__(self, cfg: ClaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ClaForCausalLM(nn.Module):
    """Parameter names follow HF Llama (``model.layers.N.self_attn.q_proj.weight``, ...), so
    ``state_dict()`` is already in the shared safetensors format."""

    def __init__(self, cfg: ClaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix; the two projections that write
        into the residual stream (o_proj, down_proj) are scaled by 1/sqrt(2 * layers);
        norm scales start at 1."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (or [T]) -> logits [B, T, vocab] (or [T, vocab])."""
        squeeze = input_ids.ndim == 1
        if squeeze:
            input_ids = input_ids[None]
        t = input_ids.shape[1]
        cos, sin = rope_cos_sin(
            self.config.head_dim, self.config.rope_theta, torch.arange(t, device=input_ids.device)
        )
        x = self.model.embed_tokens(input_ids)
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.model.layers:
            x = layer(x, shared_kv, cos, sin)
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)
        return logits[0] if squeeze else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the shared format, float32, contiguous, on CPU."""
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}


def load_state(model: ClaForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Loads tensors of the shared format, insisting on an exact set of names."""
    expected = set(model.state_dict().keys())
    got = set(tensors.keys())
    if expected != got:
        raise ValueError(
            f"tensor names do not match the config: missing {sorted(expected - got)[:5]}, "
            f"unexpected {sorted(got - expected)[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
