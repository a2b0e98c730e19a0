"""The Eso-LM backbone: the paper's DiT (adaLN) and the AR baseline's causal transformer.

One module serves every model of esolm. What makes a model Eso-LM, MDLM, BD3-LM or AR is the order
of its input tokens, the rotary positions given for them, and the attention mask (``esolm.model.masks``) —
not the network. Parameter names follow the authors' layout, so their checkpoints load by name.

* token embedding ``vocab_embed.embedding`` (not tied to the output layer);
* rotary embeddings on q and k with an **explicit position per token**: a permuted sequence keeps the
  original positions of its tokens;
* pre-LN blocks (LayerNorm without bias, computed in float32; dropout on the residual branches only,
  not on attention weights), adaLN shift/scale/gate from a time
  embedding (``sigma_map``), tanh-GELU MLP; adaLN modulations and the output layer start at zero;
* final LayerNorm + adaLN + linear to the vocabulary.

Inference with a conditioning fixed over many calls (samplers: sigma = 0) runs a folded path
(:meth:`DiT.frozen_conditioning`): adaLN shift/scale/gate and LayerNorm weights folded into the linear
layers, so an Eso-LM step and an AR step are the same operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from esolm.config import ModelConfig
from esolm.model.attention import KVCache, attend

Tensor = torch.Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64 runs stay float64)."""
    return x if x.dtype == torch.float64 else x.float()


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in at least float32 (as the authors' DiT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(at_least_fp32(x), [self.dim])
        return y * self.weight


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the noise level followed by an MLP (``sigma_map``)."""

    def __init__(self, cond_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
        half = dim // 2
        dtype = at_least_fp32(t.float() if not t.is_floating_point() else t).dtype
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        w = self.mlp[0].weight
        t = t.to(w.dtype) if w.dtype == torch.float64 else t
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class Rotary(nn.Module):
    """Rotary embedding (GPT-NeoX half rotation) evaluated at explicit positions."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: [B, S] integer → cos, sin: [B, 1, S, head_dim] in float32 (float64 if the buffer is)."""
        freqs = positions.to(at_least_fp32(self.inv_freq).dtype)[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = at_least_fp32(x)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-LN transformer block; with ``adaln`` the DiT block with shift/scale/gate modulation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * d, d)
        )
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d) if cfg.adaln else None

    def _attention(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   cache: KVCache | None, layer: int) -> Tensor:
        b, s, d = h.shape
        qkv = self.attn_qkv(h).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k, v = apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin), qkv[2]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # no dropout on the attention weights: as in the authors' DiT, dropout acts on the residual branches
        out = attend(q, k, v, mask)
        return self.attn_out(out.transpose(1, 2).reshape(b, s, d))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """adaLN shift/scale/gate (each [B, 1, d]) for the conditioning vector ``c`` [B, cond_dim]."""
        return self.adaLN_modulation(c)[:, None].chunk(6, dim=2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], c: Tensor | None, mask: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """``c``: the conditioning vector [B, cond_dim] (``None`` without adaLN)."""
        drop = self.dropout if self.training else 0.0
        if self.adaLN_modulation is None:
            x = x + F.dropout(self._attention(self.norm1(x), rope, mask, cache, layer), drop, self.training)
            return x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        h = self._attention(modulate(self.norm1(x), shift1, scale1), rope, mask, cache, layer)
        x = x + gate1 * F.dropout(h, drop, self.training)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(h, drop, self.training)


class EmbeddingLayer(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding[ids]


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_size)
        self.linear = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size) if cfg.adaln else None

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.adaLN_modulation(c)[:, None].chunk(2, dim=2)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        h = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.modulation(c)
            h = modulate(h, shift, scale)
        return self.linear(h)


class FoldedBlock(NamedTuple):
    """One block with its frozen adaLN (or plain) LayerNorm affines folded into the linear layers.

    Weights are stored transposed ([in, out], contiguous) for ``torch.addmm``; a bias is ``None`` where it
    is identically zero (the AR transformer's attention, without shift).
    """

    qkv_w: Tensor
    qkv_b: Tensor | None
    out_w: Tensor
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


def _fold_input(linear_w: Tensor, linear_b: Tensor | None, ln_w: Tensor, shift: Tensor | None,
                scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``Linear(modulate(LN(x) * ln_w, shift, scale))`` as ``LN(x) @ W + b`` (LN without affine):
    ``W = (linear_w * (ln_w * (1 + scale)))^T``, ``b = linear_b + linear_w @ shift``."""
    g = ln_w if scale is None else ln_w * (1 + scale)
    w = (linear_w * g).t().contiguous()
    b = linear_b
    if shift is not None:
        b = linear_w @ shift if b is None else b + linear_w @ shift
    return w, b


def _residual(x: Tensor, h: Tensor, w: Tensor, bias: Tensor | None, drop: float) -> Tensor:
    """``x + dropout(h @ w + bias)``; without dropout the product is accumulated into ``x`` (one ``addmm``)."""
    if drop:
        y = h @ w if bias is None else torch.addmm(bias, h, w)
        return x + F.dropout(y, drop, True)
    x = torch.addmm(x, h, w)
    return x if bias is None else x.add_(bias)


@dataclass
class FrozenConditioning:
    """A conditioning fixed over many inference calls, folded into the weights (see
    :meth:`DiT.frozen_conditioning`): with it every block is LayerNorm (no affine) -> linear layers, the
    same operations for the adaLN DiT and the AR transformer."""

    batch_size: int
    blocks: list[FoldedBlock]
    final_w: Tensor
    final_b: Tensor
    cos: Tensor  # rotary tables [max positions, head_dim]; ``sin`` carries the sign of the half rotation
    sin: Tensor
    mask_values: tuple[Tensor, Tensor]  # 0 and -inf: a boolean mask as an additive one


class DiT(nn.Module):
    """The esolm backbone.

    ``forward(input_ids, positions=None, mask=None, sigma=None, cache=None, commit=0, cond=None,
    logits_slice=None)``

    * ``input_ids`` [B, S]: tokens in the order the method chose (sorted order);
    * ``positions`` [B, S]: each token's original position for rotary (default ``arange(S)``);
      a 2L input ``[z ; x]`` passes its sorted positions twice;
    * ``mask``: boolean attention mask from :mod:`esolm.model.masks` (``None`` = full attention);
    * ``sigma`` [B]: noise-level conditioning (default 0, as Eso-LM and MDLM use);
    * ``cache``/``commit``: with a :class:`KVCache`, the new tokens attend to the cached ones too, and
      the keys/values of the first ``commit`` new tokens are kept;
    * ``cond``: a :meth:`frozen_conditioning` (replaces ``sigma``): the folded inference path;
    * ``logits_slice``: compute the output layer only for ``x[:, logits_slice]`` (e.g. the z-half of a
      2L pass, or the masks of a sampling step) — the vocabulary projection is skipped elsewhere.

    Returns float32 logits (float64 for a float64 model) [B, S, vocab] (raw: no mask-logit handling), or
    [B, len(slice), vocab].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim, config.frequency_embedding_size) if config.adaln else None
        self.rotary_emb = Rotary(config.head_dim, config.rope_base)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.output_layer = FinalLayer(config)
        self.reset_zero_init()

    def _zero_init_layers(self) -> list[nn.Linear]:
        mods = [b.adaLN_modulation for b in self.blocks] + [self.output_layer.adaLN_modulation,
                                                             self.output_layer.linear]
        return [m for m in mods if m is not None]

    def reset_zero_init(self) -> None:
        """Zero the adaLN modulations and the output layer (the paper's initialisation)."""
        with torch.no_grad():
            for m in self._zero_init_layers():
                m.weight.zero_()
                m.bias.zero_()

    def randomize_zero_init(self, std: float) -> DiT:
        """Draw the zero-initialised layers from N(0, std^2) (global RNG), so that a fresh network's logits
        depend on its input: what tests and benchmarks of untrained networks need."""
        with torch.no_grad():
            for m in self._zero_init_layers():
                m.weight.normal_(0.0, std)
                m.bias.normal_(0.0, std)
        return self

    @property
    def device(self) -> torch.device:
        return self.vocab_embed.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (that of the keys/values a KV cache holds)."""
        return self.vocab_embed.embedding.dtype

    def kv_layout(self) -> tuple[int, int, int]:
        """``(n_layers, kv_heads, head_dim)``: a KV cache entry of one layer is ``[B, kv_heads, S, head_dim]``
        (here every attention head has its own keys/values: ``kv_heads = n_heads``)."""
        return self.config.n_layers, self.config.n_heads, self.config.head_dim

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, max_len or self.config.length)

    def conditioning(self, batch_size: int, sigma: Tensor | None = None) -> Tensor | None:
        if self.sigma_map is None:
            return None
        if sigma is None:
            sigma = torch.zeros(batch_size, device=self.device)
        return F.silu(self.sigma_map(sigma.reshape(-1).expand(batch_size)))

    @torch.no_grad()
    def frozen_conditioning(self, batch_size: int, sigma: Tensor | None = None) -> FrozenConditioning:
        """Fold a conditioning that stays fixed over many inference calls into the weights.

        Eso-LM and MDLM condition on sigma = 0 throughout sampling (the same for every row), so each
        ``modulate(LN(x), shift, scale)`` followed by a linear layer is a LayerNorm without affine followed
        by a linear layer with weight ``W diag(w_LN (1 + scale))`` and bias ``b + W shift``, and each gate
        scales the rows of the branch's output layer. The AR transformer folds its LayerNorm weights the
        same way, so both run one op sequence (:meth:`forward` with ``cond=``). The logits equal the
        unfolded ones up to rounding. The folded weights are detached: for inference only. ``sigma``: one
        noise level shared by every row (default 0). Positions must be below ``config.length`` (rotary
        tables are precomputed).
        """
        c = self.conditioning(1, None if sigma is None else self._uniform_sigma(sigma))
        blocks = []
        for blk in self.blocks:
            if c is None:
                shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = None
            else:
                shift1, scale1, gate1, shift2, scale2, gate2 = (m.reshape(-1) for m in blk.modulation(c))
            fc1, fc2 = blk.mlp[0], blk.mlp[2]
            qkv_w, qkv_b = _fold_input(blk.attn_qkv.weight, None, blk.norm1.weight, shift1, scale1)
            fc1_w, fc1_b = _fold_input(fc1.weight, fc1.bias, blk.norm2.weight, shift2, scale2)
            out_w, fc2_w, fc2_b = blk.attn_out.weight, fc2.weight, fc2.bias
            if gate1 is not None:
                out_w, fc2_w, fc2_b = out_w * gate1[:, None], fc2_w * gate2[:, None], fc2_b * gate2
            blocks.append(FoldedBlock(qkv_w, qkv_b, out_w.t().contiguous(), fc1_w, fc1_b,
                                      fc2_w.t().contiguous(), fc2_b))
        final = self.output_layer
        shift, scale = (None, None) if c is None else (m.reshape(-1) for m in final.modulation(c))
        final_w, final_b = _fold_input(final.linear.weight, final.linear.bias, final.norm_final.weight, shift,
                                       scale)
        cos, sin = self.rotary_emb(torch.arange(self.config.length, device=self.device)[None])
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        zero = final_w.new_zeros(())
        return FrozenConditioning(batch_size, blocks, final_w, final_b, cos[0, 0], sin[0, 0],
                                  (zero, zero - math.inf))

    @staticmethod
    def _uniform_sigma(sigma: Tensor) -> Tensor:
        flat = sigma.reshape(-1)
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise ValueError("a frozen conditioning needs one noise level shared by every row")
        return flat[:1]

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                sigma: Tensor | None = None, cache: KVCache | None = None, commit: int = 0,
                cond: FrozenConditioning | None = None, logits_slice: slice | None = None) -> Tensor:
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        if cond is not None:
            if cond.batch_size != b:
                raise ValueError(f"frozen conditioning is for batch size {cond.batch_size}, input has {b}")
            return self._forward_folded(input_ids, positions, mask, cache, commit, cond, logits_slice)
        x = self.vocab_embed(input_ids)
        c = self.conditioning(b, sigma)
        rope = self.rotary_emb(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, c, mask, cache, i)
        if cache is not None:
            cache.commit(commit)
        if logits_slice is not None:
            x = x[:, logits_slice]
        return at_least_fp32(self.output_layer(x, c))

    def _forward_folded(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None,
                        commit: int, cond: FrozenConditioning, logits_slice: slice | None) -> Tensor:
        """:meth:`forward` with the folded weights of ``cond``: per block LayerNorm -> qkv -> rotary ->
        attention -> output projection added to the residual (one ``addmm``), the same for the MLP.

        A boolean mask becomes an additive one once, not once per layer. With ``logits_slice``, the last
        block runs attention and MLP only for the sliced rows (the others' outputs are never read; their
        keys and values are still cached).
        """
        b, rows = input_ids.shape
        d, n_heads, head_dim = self.config.hidden_size, self.config.n_heads, self.config.head_dim
        drop = self.config.dropout if self.training else 0.0
        x = self.vocab_embed.embedding[input_ids].view(b * rows, d)
        cos, sin = cond.cos[positions][:, None], cond.sin[positions][:, None]  # [B, 1, S, head_dim]
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, *cond.mask_values)
        last = len(cond.blocks) - 1
        for i, blk in enumerate(cond.blocks):
            h = F.layer_norm(x, (d,))
            qkv = torch.mm(h, blk.qkv_w) if blk.qkv_b is None else torch.addmm(blk.qkv_b, h, blk.qkv_w)
            qkv = qkv.view(b, rows, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
            qk = qkv[:2] * cos + qkv[:2].roll(head_dim // 2, -1) * sin  # rotary on q and k at once
            q, k, v = qk[0], qk[1], qkv[2]
            if cache is not None:
                k, v = cache.update(i, k, v)
            if i == last and logits_slice is not None:
                q, x = q[:, :, logits_slice], x.view(b, rows, d)[:, logits_slice].reshape(-1, d)
                rows = q.shape[2]
                if mask is not None and mask.shape[-2] > 1:
                    mask = mask[..., logits_slice, :]
            h = attend(q, k, v, mask).transpose(1, 2).reshape(b * rows, d)
            x = _residual(x, h, blk.out_w, None, drop)
            h = F.gelu(torch.addmm(blk.fc1_b, F.layer_norm(x, (d,)), blk.fc1_w), approximate="tanh")
            x = _residual(x, h, blk.fc2_w, blk.fc2_b, drop)
        if cache is not None:
            cache.commit(commit)
        logits = torch.addmm(cond.final_b, F.layer_norm(x, (d,)), cond.final_w)
        return at_least_fp32(logits.view(b, -1, logits.shape[-1]))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
