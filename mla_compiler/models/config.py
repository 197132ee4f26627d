"""Configurations of the reference MLA models.

The attention dimensions the kernel sees are derived, not stored:
    d_qk = kv_lora_rank + qk_rope_head_dim     (latent + rope: 512 + 64 = 576 for DeepSeek-V3.2)
    d_v  = kv_lora_rank                        (the latent; the value projection is absorbed after)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MLAConfig:
    dim: int = 512
    n_layers: int = 2
    vocab_size: int = 1024
    inter_dim: int = 1024
    n_heads: int = 8
    q_lora_rank: int = 256
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_topk: int = 64
    max_seq_len: int = 512
    original_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    mscale: float = 1.0

    @property
    def d_qk(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def d_v(self) -> int:
        return self.kv_lora_rank

    @property
    def softmax_scale(self) -> float:
        """As DeepSeek-V3.2: (nope + rope)^-0.5, times mscale^2 past the original context."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.max_seq_len > self.original_seq_len:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def with_(self, **changes) -> "MLAConfig":
        return replace(self, **changes)


def deepseek_v32_small(**changes) -> MLAConfig:
    """DeepSeek-V3.2 head dimensions (latent 512 + rope 64 = d_qk 576, d_v 512), fewer heads and layers."""
    return MLAConfig(**changes)


def nam56r_small(**changes) -> MLAConfig:
    """NAM56R-style narrow attention: d_qk 128 (latent 64 + rope 64), d_v 64."""
    base = dict(
        dim=256,
        inter_dim=512,
        n_heads=6,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        index_n_heads=2,
        index_head_dim=64,
        index_topk=48,
    )
    base.update(changes)
    return MLAConfig(**base)
