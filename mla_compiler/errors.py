"""Exceptions users can catch by name."""


class SparseAttnArgumentError(ValueError):
    """A call of ``sparse_mla.sparse_attn`` got an argument outside the op's contract.

    The message names the argument, what was expected and how to fix the call.
    """


class BackendOptionError(TypeError):
    """``make_backend`` got an unknown option or a value it does not take."""


class SiteLoweringError(RuntimeError):
    """A matched site could not be lowered; raised only under ``make_backend(strict=True)``."""


class FP8DispatchError(RuntimeError):
    """An FP8 tensor reached a site no FP8 kernel takes, under ``make_backend(fp8="preserve")``.

    The message names the tensor, its storage facts and the options: keep FP8 by changing the
    layout, or allow the counted, logged fallback with ``make_backend(fp8="dequantize")``.
    """


class ShardOrderError(AssertionError):
    """torchao's FP8 conversion ran after FSDP2's ``fully_shard``: DTensor is not the outermost
    subclass and the FP8 weights would never be all-gathered. The message names the module and
    the fix (convert first, then shard; or ``mla_compiler.distributed.prepare_fp8_fsdp``).

    An AssertionError so that torch.compile reports it as raised, before it traces the model.
    """
