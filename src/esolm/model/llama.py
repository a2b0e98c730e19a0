"""A Llama-family backbone (SmolLM2, Llama 2/3 without rope scaling) behind esolm's method-agnostic network
interface: the same ``forward`` as :class:`esolm.model.backbone.DiT`, so every sampler and likelihood of esolm
runs on it unchanged.

What makes it Eso-LM, AR or anything else is, as for the DiT, the order of the input tokens, their rotary
positions and the boolean attention mask (:mod:`esolm.model.masks`) — not the network.

* token embedding ``embed_tokens.weight`` of ``base_vocab_size + 1`` rows: the pretrained vocabulary, then the
  **mask token** (``mask_id = base_vocab_size``), initialised to the mean of the pretrained rows;
* pre-norm blocks: RMSNorm, grouped-query attention (``n_kv_heads`` key/value heads shared by
  ``n_heads / n_kv_heads`` query heads each) with rotary embeddings at an **explicit position per token**
  (Hugging Face's rotate-half convention, base ``rope_theta``), SwiGLU MLP; no biases, no dropout, no time
  conditioning (no adaLN);
* final RMSNorm and the output layer: the embedding matrix when ``tie_word_embeddings`` (SmolLM2), else
  ``lm_head.weight`` of ``base_vocab_size + 1`` rows, whose mask row starts at zero. The mask's output logit
  carries a fixed bias :data:`MASK_OUTPUT_BIAS` (-1e6), so the mask is never predicted; esolm's losses and
  samplers replace that logit anyway (``-1e6`` in ``token_nll``, ``-inf`` in ``draw``), so it receives no
  gradient.

Parameter names are Hugging Face's without the ``model.`` prefix (``layers.0.self_attn.q_proj.weight``, ...):
:mod:`esolm.io.llama` loads a Llama folder or GGUF file by name.

Precision follows Hugging Face's ``LlamaForCausalLM`` in float32/bfloat16/float16 (RMSNorm statistics and
rotary tables in float32, the rest in the weights' dtype), and is float64 throughout when the weights are
float64 — where Hugging Face's implementation would drop to float32 — so that esolm's identities (KV cache
== uncached, one-pass likelihood == per-token passes) can be proven to 1e-10.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esolm.config import MAX_LENGTH
from esolm.errors import ConfigError
from esolm.model.attention import KVCache, attend
from esolm.model.backbone import at_least_fp32

Tensor = torch.Tensor

# The mask token's fixed output bias: its logit is ``h . w_mask - 1e6``, never the argmax of a trained or random
# model. (The value of ``esolm.objectives.MASK_LOGIT``; not imported: esolm.objectives imports esolm.model.)
MASK_OUTPUT_BIAS = -1e6

# Low-rank adapters (``lora_rank > 0``): every attention and MLP projection gets ``W + (alpha / r) B A``; with
# ``lora_gate = "mask"`` the delta acts only on rows whose *input* is the mask token (and ``mask_delta`` is added
# to the mask's embedding), so a row fed a real token computes exactly the base network: under the shifted query
# convention the AR mode (every query reads a real token) stays the pretrained model, bit for bit.
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LORA_GATES = ("mask", "all")


def is_adapter_name(name: str) -> bool:
    """Whether a state-dict name is an adapter delta (LoRA factors or the mask embedding's delta)."""
    return name.endswith((".lora_a", ".lora_b")) or name == "mask_delta"


@dataclass(frozen=True)
class EsoLlamaConfig:
    """Architecture of an :class:`EsoLlama`: a Llama network plus one appended mask token.

    ``vocab_size`` (``base_vocab_size + 1``) and ``mask_id`` (``base_vocab_size``) are derived: the mask is always
    the row appended after the pretrained vocabulary. ``length`` is the longest sequence (number of rotary
    positions and default KV-cache capacity) the model is used for.
    """

    base_vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    length: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    shifted: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_gate: str = "mask"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding and of the logits: the pretrained vocabulary and the mask token."""
        return self.base_vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.base_vocab_size

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def validate(self) -> None:
        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("base_vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "length"):
            v = getattr(self, name)
            req(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{name} must be a positive integer, got {v!r}")
        req(self.length <= MAX_LENGTH, f"model length {self.length:,} is larger than esolm accepts ({MAX_LENGTH:,})")
        req(self.n_heads % self.n_kv_heads == 0,
            f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) for grouped-query attention")
        req(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            req(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                f"{name} must be a positive finite number, got {v!r}")
        for name in ("tie_word_embeddings", "shifted"):
            v = getattr(self, name)
            req(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
        req(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 0,
            f"lora_rank must be a non-negative integer, got {self.lora_rank!r}")
        req(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
            and 0 < self.lora_alpha < float("inf"),
            f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        req(self.lora_gate in LORA_GATES, f"lora_gate must be one of {', '.join(LORA_GATES)}, got {self.lora_gate!r}")

    def parameter_count(self) -> int:
        """Number of parameters of ``EsoLlama(self)``, without building it."""
        d, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        block = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 2 * d
        heads = 1 if self.tie_word_embeddings else 2
        adapter = 0
        if self.lora_rank:  # LoRA factors A [r, in] and B [out, r] per projection, then the mask embedding delta
            inter = self.intermediate_size
            io_sizes = [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]
            adapter = self.n_layers * self.lora_rank * sum(i + o for i, o in io_sizes) + d
        return heads * self.vocab_size * d + self.n_layers * block + d + adapter

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of ``EsoLlama(self).state_dict()``, in its order, without building it (the mask row
        included: ``vocab_size`` rows)."""
        v, d, inter = self.vocab_size, self.hidden_size, self.intermediate_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q), p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                p + "mlp.down_proj.weight": (d, inter)})
            if self.lora_rank:
                r = self.lora_rank
                for name in LORA_TARGETS:
                    out_f, in_f = shapes[p + name + ".weight"]
                    shapes[p + name + ".lora_a"] = (r, in_f)
                    shapes[p + name + ".lora_b"] = (out_f, r)
        shapes["norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, d)
        if self.lora_rank:
            shapes["mask_delta"] = (d,)
        return shapes

    def base(self) -> EsoLlamaConfig:
        """The same network without an adapter (the adapter fields at their defaults)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("lora_")}
        return dataclasses.replace(self, **defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EsoLlamaConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a Llama config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Llama config keys: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"the Llama config lacks {', '.join(missing)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class RMSNorm(nn.Module):
    """Hugging Face's ``LlamaRMSNorm``: statistics in at least float32, the scale in the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = at_least_fp32(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` in ``x``'s dtype (the tables are cast to it, as Hugging Face does)."""
    return x * cos + rotate_half(x) * sin


class Rotary:
    """Rotary tables at explicit positions. The inverse frequencies are computed in the dtype of the angles
    (float32, as Hugging Face, or float64 for a float64 model) and kept per (dtype, device): not a buffer, so
    casting the model to bfloat16 never rounds them."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = float(theta)
        self._inv_freq: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def inv_freq(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).to(dtype) / self.head_dim
            self._inv_freq[key] = 1.0 / (self.theta ** exponent)
        return self._inv_freq[key]

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, S] -> cos, sin [B, 1, S, head_dim] in ``dtype`` (angles in at least float32)."""
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = positions.to(angle_dtype)[..., None] * self.inv_freq(angle_dtype, positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rows(gate: Tensor | None, rows: slice) -> Tensor | None:
    return gate[:, rows] if gate is not None and gate.dim() == 3 else gate


class Linear(nn.Linear):
    """A bias-free projection, optionally with a low-rank adapter: ``W x + gate * scale * B (A x)``.

    ``lora_a`` [r, in] starts uniform in ``+-1/sqrt(in)`` (``nn.Linear``'s default), ``lora_b`` [out, r] at zero, so
    an adapter starts as the identity change. ``gate`` (``forward``'s second argument): ``None`` computes the base
    projection alone; a tensor ([B, S, 1] or a scalar) scales the delta per token."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0, scale: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.rank, self.scale = rank, scale
        if rank:
            self.lora_a = nn.Parameter(torch.empty(rank, in_features))
            self.lora_b = nn.Parameter(torch.empty(out_features, rank))

    @torch.no_grad()
    def reset_adapter(self) -> None:
        if self.rank:
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_a.uniform_(-bound, bound)
            self.lora_b.zero_()

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        y = F.linear(x, self.weight)
        if self.rank and gate is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * (gate * self.scale)
        return y


class Attention(nn.Module):
    """Grouped-query self-attention; the KV cache holds the ``n_kv_heads`` un-expanded heads."""

    def __init__(self, cfg: EsoLlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.groups = cfg.n_heads, cfg.n_kv_heads, hd, cfg.kv_groups
        r, scale = cfg.lora_rank, cfg.lora_alpha / max(cfg.lora_rank, 1)
        self.q_proj = Linear(d, cfg.n_heads * hd, r, scale)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, r, scale)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, r, scale)
        self.o_proj = Linear(cfg.n_heads * hd, d, r, scale)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.head_dim).transpose(1, 2)

    def _expand(self, kv: Tensor) -> Tensor:
        """[B, n_kv, K, D] -> [B, n_heads, K, D]: query head h reads key/value head h // groups (HF ``repeat_kv``)."""
        if self.groups == 1:
            return kv
        b, n, k, d = kv.shape
        return kv[:, :, None].expand(b, n, self.groups, k, d).reshape(b, n * self.groups, k, d)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None,
                layer: int, rows: slice | None, gate: Tensor | None = None) -> Tensor:
        """``rows``: compute only these queries (their keys/values are computed for every token). ``gate``: the
        adapter gate of every token ([B, S, 1], or a scalar; ``None``: no adapter delta)."""
        cos, sin = rope
        k = apply_rotary(self._heads(self.k_proj(h, gate), self.n_kv_heads), cos, sin)
        v = self._heads(self.v_proj(h, gate), self.n_kv_heads)
        if rows is not None:
            h, cos, sin = h[:, rows], cos[:, :, rows], sin[:, :, rows]
            gate = _rows(gate, rows)
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., rows, :]
        q = apply_rotary(self._heads(self.q_proj(h, gate), self.n_heads), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = attend(q, self._expand(k), self._expand(v), mask)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim), gate)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: EsoLlamaConfig):
        super().__init__()
        r, scale = cfg.lora_rank, cfg.lora_alpha / max(cfg.lora_rank, 1)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, r, scale)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, r, scale)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, r, scale)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, gate)) * self.up_proj(x, gate), gate)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EsoLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None,
                layer: int, rows: slice | None = None, gate: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, rows, gate)
        if rows is not None:
            x, gate = x[:, rows], _rows(gate, rows)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), gate)


class EsoLlama(nn.Module):
    """The Llama backbone with esolm's interface.

    ``forward(input_ids, positions=None, mask=None, sigma=None, cache=None, commit=0, cond=None,
    logits_slice=None)``, as :meth:`esolm.model.backbone.DiT.forward`:

    * ``input_ids`` [B, S]: tokens in the order the method chose; ``positions`` [B, S]: each token's rotary
      position (default ``arange(S)``), in any order;
    * ``mask``: boolean attention mask broadcastable to [B, 1, S, S_kv] (``True`` = may attend; ``None`` =
      full attention), over the cached keys then the new ones;
    * ``cache``/``commit``: with a :class:`~esolm.model.attention.KVCache`, the new tokens attend to the cached
      ones too, and the keys/values of the first ``commit`` new tokens are kept;
    * ``sigma``, ``cond``: accepted and ignored (no time conditioning; :meth:`frozen_conditioning` gives
      ``None``);
    * ``logits_slice``: compute the last block's queries and the output layer only for ``x[:, logits_slice]``.

    Returns raw logits [B, S | len(slice), vocab_size] in float32 (float64 for a float64 model).
    """

    def __init__(self, config: EsoLlamaConfig):
        super().__init__()
        if not isinstance(config, EsoLlamaConfig):
            raise ConfigError(f"EsoLlama needs an EsoLlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.mask_delta = nn.Parameter(torch.empty(config.hidden_size)) if config.lora_rank else None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Hugging Face's Llama initialisation (normal(0, std) weights, unit norms), then :meth:`init_mask_token`."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif not is_adapter_name(name):
                p.normal_(0.0, std)
        self.init_mask_token()
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Fresh adapter deltas (LoRA ``A`` uniform, ``B`` and ``mask_delta`` zero): the network computes exactly
        the base one until they are trained. Nothing to do without an adapter."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.reset_adapter()
        if self.mask_delta is not None:
            self.mask_delta.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's deltas by state-dict name (empty without an adapter)."""
        return {name: p for name, p in self.named_parameters() if is_adapter_name(name)}

    def freeze_base(self) -> EsoLlama:
        """Train the adapter only: ``requires_grad`` False on every base weight, True on the deltas."""
        if not self.config.lora_rank:
            raise ConfigError("this EsoLlama has no adapter to train (lora_rank is 0)")
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_name(name))
        return self

    @torch.no_grad()
    def init_mask_token(self) -> None:
        """The mask's embedding row := the mean of the pretrained rows; its untied output row := 0."""
        emb = self.embed_tokens.weight
        mask_id = self.config.mask_id
        emb[mask_id] = at_least_fp32(emb[:mask_id]).mean(0).to(emb.dtype)
        if self.lm_head is not None:
            self.lm_head.weight[mask_id] = 0.0

    @property
    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (that of the keys/values a KV cache holds)."""
        return self.embed_tokens.weight.dtype

    def kv_layout(self) -> tuple[int, int, int]:
        """``(n_layers, kv_heads, head_dim)``: a KV cache entry of one layer is ``[B, kv_heads, S, head_dim]``
        (the ``n_kv_heads`` un-expanded key/value heads), as :meth:`esolm.model.backbone.DiT.kv_layout`."""
        return self.config.n_layers, self.config.n_kv_heads, self.config.head_dim

    @classmethod
    def assemble(cls, config: EsoLlamaConfig, state: dict[str, Tensor], dtype: torch.dtype | None = None) -> EsoLlama:
        """An EsoLlama (eval mode) holding ``state`` — its own parameter names, every one present, shapes
        checked by the caller — in ``dtype`` (default: the embedding's). Built on the meta device and filled by
        assignment: no random initialisation, and no copy of tensors already in ``dtype``."""
        dtype = dtype or state["embed_tokens.weight"].dtype
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict({k: t.to(dtype) for k, t in state.items()}, strict=True, assign=True)
        return model.eval()

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, max_len or self.config.length)

    def frozen_conditioning(self, batch_size: int, sigma: Tensor | None = None) -> None:
        """Nothing to fold: the network has no time conditioning. Samplers pass the ``None`` back as ``cond``."""
        return None

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                sigma: Tensor | None = None, cache: KVCache | None = None, commit: int = 0,
                cond: None = None, logits_slice: slice | None = None) -> Tensor:
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.embed_tokens(input_ids)
        gate = None
        if self.config.lora_rank:
            is_mask = (input_ids == self.config.mask_id)[..., None].to(x.dtype)
            x = x + is_mask * self.mask_delta
            if self.config.lora_gate == "all":
                gate = x.new_ones(())
            elif bool(is_mask.any()):  # no mask fed: the base network, without computing zero deltas
                gate = is_mask
        rope = self.rotary(positions, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i, logits_slice if i == last else None, gate)
        if cache is not None:
            cache.commit(commit)
        logits = F.linear(self.norm(x), self.output_weight)
        logits[..., self.config.mask_id] += MASK_OUTPUT_BIAS
        return at_least_fp32(logits)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def add_adapter(model: EsoLlama, rank: int = 8, alpha: float = 16.0, gate: str = "mask") -> EsoLlama:
    """A new EsoLlama holding ``model``'s base weights (the same tensors, not copies) and fresh adapter deltas
    of ``rank`` (:meth:`EsoLlama.reset_adapter`; ``A`` drawn from torch's global generator), in ``model``'s dtype
    and device."""
    config = dataclasses.replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_gate=gate)
    base = {k: v for k, v in model.state_dict().items() if not is_adapter_name(k)}
    ref = model.embed_tokens.weight
    with torch.device("meta"):
        new = EsoLlama(config)
    fresh = {k: torch.empty(shape, dtype=ref.dtype, device=ref.device)
             for k, shape in config.state_shapes().items() if is_adapter_name(k)}
    new.load_state_dict({**base, **fresh}, strict=True, assign=True)
    new.reset_adapter()
    return new.train(model.training)



__all__ = ["EsoLlamaConfig", "EsoLlama", "Linear", "MASK_OUTPUT_BIAS", "LORA_TARGETS", "LORA_GATES",
           "is_adapter_name", "add_adapter"]
