"""Reference MLA models users can run (DeepSeek-V3.2-like and NAM56R-like configurations)."""

from mla_compiler.models.config import MLAConfig, deepseek_v32_small, nam56r_small
from mla_compiler.models.mla import MLA, Block, Indexer, TinyMLAModel, apply_rotary, attention_layer, causal_mask, rotary_tables

__all__ = [
    "MLAConfig",
    "deepseek_v32_small",
    "nam56r_small",
    "MLA",
    "Block",
    "Indexer",
    "TinyMLAModel",
    "apply_rotary",
    "attention_layer",
    "causal_mask",
    "rotary_tables",
]
