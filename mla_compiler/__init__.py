"""mla_compiler: a torch.compile backend for sparse multi-head latent attention.

    torch.compile(model, backend="sparse_mla")          # registered through an entry point
    torch.compile(model, backend=mla_compiler.make_backend(inner="aot_eager"))
    print(mla_compiler.explain(model, *inputs))         # what matched, what was rejected and why
    gm = mla_compiler.rewrite(model, *inputs)           # one FX graph calling the canonical op

Importing this package registers the canonical op ``torch.ops.sparse_mla.sparse_attn``.
"""

from mla_compiler.backend import BackendOptions, SparseMLABackend, make_backend
from mla_compiler.debug.explain import ExplainReport, explain
from mla_compiler.export import rewrite
from mla_compiler.errors import BackendOptionError, FP8DispatchError, ShardOrderError, SiteLoweringError, SparseAttnArgumentError
from mla_compiler.lowering.ops import sparse_attn, sparse_attn_bwd, sparse_attn_fp8kv

__version__ = "0.1.0"

# Every torch.compile checks the module it traces for FP8-conversion-after-fully_shard first.
from mla_compiler.distributed import install_compile_check as _install_compile_check  # noqa: E402

_install_compile_check()

__all__ = [
    "BackendOptions",
    "SparseMLABackend",
    "make_backend",
    "ExplainReport",
    "explain",
    "rewrite",
    "BackendOptionError",
    "FP8DispatchError",
    "ShardOrderError",
    "SiteLoweringError",
    "SparseAttnArgumentError",
    "sparse_attn",
    "sparse_attn_bwd",
    "sparse_attn_fp8kv",
]
