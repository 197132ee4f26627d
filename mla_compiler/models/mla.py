"""Reference MLA models in plain PyTorch, written the way DeepSeek-V3.2's inference code writes them.

Absorbed MLA with a lightning-indexer top-k: queries are projected into the latent through the key
half of ``wkv_b``, scores are a latent einsum plus a rope einsum times the softmax scale, the top-k
selection is an index mask ``full(-inf).scatter_(-1, topk, 0)`` plus the causal mask, softmax in
fp32, a weighted sum over the latent, then the value half of ``wkv_b``. Nothing here knows about
the compiler: ``torch.compile(model, backend="sparse_mla")`` finds the attention in the graph.

The indexer is DeepSeek's without FP8 and the Hadamard rotation: per-head ReLU scores, weighted by
a learned per-head gate, summed, causally masked, top-k. Its top-k is not differentiable; as in
DeepSeek-V3.2, the indexer would be trained by a separate loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mla_compiler.lowering import ops as _ops  # noqa: F401 - registers torch.ops.sparse_mla (FP8 cache ops)
from mla_compiler.models.config import MLAConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary_tables(cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq_len, rope/2] in fp32 (DeepSeek's YaRN-free base frequencies)."""
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding of x [b, s, h, d] with cos/sin [s, d/2] (real arithmetic)."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c = cos.view(1, x.size(1), 1, -1)
    s = sin.view(1, x.size(1), 1, -1)
    y = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return y.flatten(-2).to(dtype)


class Indexer(nn.Module):
    """Lightning indexer: which ``index_topk`` earlier tokens each query attends to."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)

    def forward(self, x, qr, cos, sin, mask, k_cache: Optional[torch.Tensor] = None, end_pos: int = 0):
        cfg = self.cfg
        bsz, seqlen, _ = x.size()
        rope = cfg.qk_rope_head_dim
        q = self.wq_b(qr).view(bsz, seqlen, cfg.index_n_heads, cfg.index_head_dim)
        q_pe, q_nope = torch.split(q, [rope, cfg.index_head_dim - rope], dim=-1)
        q = torch.cat([apply_rotary(q_pe, cos, sin), q_nope], dim=-1)
        k = self.k_norm(self.wk(x))
        k_pe, k_nope = torch.split(k, [rope, cfg.index_head_dim - rope], dim=-1)
        k = torch.cat([apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2), k_nope], dim=-1)
        if k_cache is not None:
            k_cache[:bsz, end_pos - seqlen:end_pos] = k
            k = k_cache[:bsz, :end_pos]
        weights = self.weights_proj(x) * cfg.index_n_heads**-0.5 * cfg.index_head_dim**-0.5
        scores = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
        index_score = (scores * weights.float().unsqueeze(-1)).sum(dim=2)
        if mask is not None:
            index_score = index_score + mask
        return index_score.topk(min(cfg.index_topk, index_score.size(-1)), dim=-1)[1]


class MLA(nn.Module):
    """Multi-head latent attention with DeepSeek sparse attention (absorbed form)."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = cfg.softmax_scale
        self.indexer = Indexer(cfg)
        # Decode caches (DeepSeek's buffers); None until ``allocate_cache``.
        self.kv_format = "bf16"
        for name in ("kv_cache", "pe_cache", "k_cache", "kv_fp8", "kv_scale"):
            self.register_buffer(name, None, persistent=False)

    def allocate_cache(self, batch: int, max_len: int, dtype: torch.dtype, device=None, kv_format: str = "bf16") -> None:
        """Latent, rope and indexer-key caches for decoding. ``kv_format``:

        "bf16"      the latent in the model's dtype (DeepSeek's code)
        "flashmla"  FlashMLA's FP8 cache, 656 bytes a token (needs latent 512 + rope 64)
        "float8"    a float8_e4m3fn latent and a float32 scale per token, dequantized as
                    ``payload.float() * scale``
        "torchao"   the same bytes read as a torchao ``Float8Tensor`` (per-row), ``.dequantize()``
        """
        cfg = self.cfg
        if kv_format not in ("bf16", "flashmla", "float8", "torchao"):
            raise ValueError(f"allocate_cache: kv_format={kv_format!r}; use 'bf16', 'flashmla', 'float8' or 'torchao'")
        self.kv_format = kv_format
        self.pe_cache = torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.k_cache = torch.zeros(batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)
        if kv_format == "bf16":
            self.kv_cache = torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        elif kv_format == "flashmla":
            if (cfg.kv_lora_rank, cfg.qk_rope_head_dim) != (512, 64):
                raise ValueError(f"allocate_cache: the FlashMLA layout holds a 512-wide latent and a 64-wide rope, not {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}")
            self.kv_fp8 = torch.zeros(batch, max_len, 656, dtype=torch.uint8, device=device)
        else:
            self.kv_fp8 = torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=torch.float8_e4m3fn, device=device)
            self.kv_scale = torch.ones(batch, max_len, 1, dtype=torch.float32, device=device)

    def _cached_latent(self, kv, k_pe, bsz, start_pos, end_pos, dtype):
        """Write this step's latent and rope into the cache; read back all of it (dequantized)."""
        fmt = self.kv_format
        if fmt == "flashmla":
            self.kv_fp8[:bsz, start_pos:end_pos] = torch.ops.sparse_mla.flashmla_kv_quant(kv, k_pe)
            kv, k_pe = torch.ops.sparse_mla.flashmla_kv_dequant(self.kv_fp8[:bsz, :end_pos])
            return kv.to(dtype), k_pe.to(dtype)
        self.pe_cache[:bsz, start_pos:end_pos] = k_pe
        k_pe = self.pe_cache[:bsz, :end_pos]
        if fmt == "bf16":
            self.kv_cache[:bsz, start_pos:end_pos] = kv
            return self.kv_cache[:bsz, :end_pos], k_pe
        amax = kv.float().abs().amax(-1, keepdim=True)
        scale = torch.clamp(amax / 448.0, min=1e-12)
        self.kv_fp8[:bsz, start_pos:end_pos] = (kv.float() / scale).to(torch.float8_e4m3fn)
        self.kv_scale[:bsz, start_pos:end_pos] = scale
        payload, scale = self.kv_fp8[:bsz, :end_pos], self.kv_scale[:bsz, :end_pos]
        if fmt == "float8":
            return (payload.float() * scale).to(dtype), k_pe
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        latent = Float8Tensor(payload, scale, block_size=[1, 1, payload.shape[-1]], dtype=dtype)
        return latent.dequantize(), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor], start_pos: int = 0) -> torch.Tensor:
        cfg = self.cfg
        bsz, seqlen, _ = x.size()
        end_pos = start_pos + seqlen
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(bsz, seqlen, self.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        q_nope, q_pe = torch.split(q, [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)
        kv = self.wkv_a(x)
        kv, k_pe = torch.split(kv, [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        if self.pe_cache is not None:
            kv, k_pe = self._cached_latent(kv, k_pe, bsz, start_pos, end_pos, x.dtype)
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, cfg.kv_lora_rank)
        q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : cfg.qk_nope_head_dim])
        scores = (
            torch.einsum("bshc,btc->bsht", q_nope.float(), kv.float())
            + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())
        ) * self.softmax_scale
        topk_indices = self.indexer(x, qr, cos, sin, mask, self.k_cache, end_pos)
        index_mask = torch.full((bsz, seqlen, end_pos), float("-inf"), device=x.device).scatter_(-1, topk_indices, 0)
        if mask is not None:
            index_mask += mask
        scores += index_mask.unsqueeze(2)
        scores = scores.softmax(dim=-1, dtype=torch.float32)
        o = torch.einsum("bsht,btc->bshc", scores.type_as(x), kv)
        o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -cfg.v_head_dim:])
        return self.wo(o.flatten(2))


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).type_as(x))


class Block(nn.Module):
    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, cos, sin, mask, start_pos: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, start_pos)
        return x + self.ffn(self.ffn_norm(x))


class TinyMLAModel(nn.Module):
    """A small decoder of MLA blocks for training runs (``checkpoint=True``: activation checkpointing)."""

    def __init__(self, cfg: MLAConfig, checkpoint: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize parameters and the rotary tables in place: after building on the meta
        device and ``to_empty(device=...)``, this gives the weights a fresh model would have."""
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif hasattr(mod, "reset_parameters") and mod is not self:
                mod.reset_parameters()
        cos, sin = rotary_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def allocate_cache(self, batch: int, max_len: int, dtype: torch.dtype = None, device=None, kv_format: str = "bf16") -> None:
        dtype = dtype or self.embed.weight.dtype
        for layer in self.layers:
            layer.attn.allocate_cache(batch, max_len, dtype, device, kv_format)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seqlen = tokens.size(1)
        h = self.embed(tokens)
        cos = self.rope_cos[start_pos:start_pos + seqlen]
        sin = self.rope_sin[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, start_pos + seqlen), float("-inf"), device=tokens.device).triu_(start_pos + 1)
        for layer in self.layers:
            if self.checkpoint and self.training:
                h = checkpoint(layer, h, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos)
        return self.head(self.norm(h)).float()


def attention_layer(cfg: MLAConfig) -> MLA:
    """One MLA attention layer (the unit the compiler rewrites), with its rotary tables attached."""
    layer = MLA(cfg)
    cos, sin = rotary_tables(cfg)
    layer.register_buffer("rope_cos", cos, persistent=False)
    layer.register_buffer("rope_sin", sin, persistent=False)
    return layer


def causal_mask(seqlen: int, device=None) -> torch.Tensor:
    return torch.full((seqlen, seqlen), float("-inf"), device=device).triu_(1)
