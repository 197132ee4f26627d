"""Records the pipeline stages hand to each other.

Plain data: every stage imports this module and this module imports no stage. Passes produce these
records by reading a graph; lowering consumes them to rewrite it; debug/ renders them.

Axis roles used in operand layouts:
    "B"  batch                      "S"  query position         "H"  query head
    "T"  key position (dense form)  "K"  selected slot (top-k)  "D0", "D1", ...  feature part i
    "V"  value feature
An axis is a tuple of roles (several when a reshape merged axes); ``()`` is a size-1 broadcast axis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch.fx

Axis = tuple[str, ...]
SizeValue = Union[int, "torch.SymInt"]


@dataclass(frozen=True)
class SizeWitness:
    """Where a role's length can be read at run time: ``node.size(dim)``; ``static`` when it is a constant."""

    static: Optional[int]
    node: Optional[torch.fx.Node] = None
    dim: int = 0

    def describe(self) -> str:
        return str(self.static) if self.static is not None else f"dynamic ({self.node.name}.size({self.dim}))"


@dataclass(frozen=True)
class Operand:
    """A tensor that enters or leaves a site, with the role of each of its axes."""

    node: torch.fx.Node
    axes: tuple[Axis, ...]

    def roles(self) -> set[str]:
        return {r for axis in self.axes for r in axis}


@dataclass(frozen=True)
class MaskTerm:
    """A mask folded into the indices.

    kind:
        "additive"   values proven to be 0 or -inf at compile time; valid where the value is 0
        "checked"    additive with values unknown at compile time; valid where 0, asserted 0/-inf at run time
        "fill"       boolean mask of a ``masked_fill(mask, -inf)``; valid where False
        "keep"       boolean condition of a ``where(cond, scores, -inf)``; valid where True
    """

    operand: Operand
    kind: str
    description: str


@dataclass(frozen=True)
class StorageFacts:
    """How a tensor is stored, read from its type and flatten output, never from ``.dtype``."""

    kind: str  # "plain", "torchao Float8Tensor", "transformer_engine Float8Tensor", ...
    logical_dtype: str
    payload_dtype: str
    scale: Optional[str] = None  # field and shape of the scale
    convention: str = "none"  # "dequant" (hp = payload * scale), "quant" (fp8 = hp * scale)
    granularity: str = "none"  # "per-tensor", "per-row", "per-128-tile", ...

    def describe(self) -> str:
        if self.kind == "plain":
            return f"plain {self.logical_dtype}"
        return (
            f"{self.kind}: payload {self.payload_dtype}, scale {self.scale} ({self.convention}, "
            f"{self.granularity}), logical {self.logical_dtype}"
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Fp8Latent:
    """The key latent of a site is FP8 storage dequantized in the user's graph.

    kind:
        "flashmla"     ``flashmla_kv_dequant(cache)``: ``source`` is the uint8 [..., 656] cache
        "subclass"     ``t.dequantize()`` of an FP8 tensor subclass: ``source`` is the subclass
                       value; ``payload_field``/``scale_field`` name its tensors
        "payload*scale"  ``payload.float() * scale`` or ``/ scale``: ``source`` the float8 payload,
                       ``scale`` the scale node, or ``scale_const`` a Python number
    ``unsupported`` says why no FP8 kernel takes this layout (None when one does).
    """

    kind: str
    facts: StorageFacts
    source: torch.fx.Node
    scale: Optional[torch.fx.Node] = None
    payload_field: str = ""
    scale_field: str = ""
    payload_dtype: Any = None  # the float8 dtype to view a uint8 payload as (Transformer Engine)
    quant_scale: bool = False  # the scale multiplies toward fp8 (torchao training, or ``payload / scale``): take its reciprocal
    scale_const: Optional[float] = None  # payload*scale with a Python-number scale (already the dequant multiplier)
    n_tiles: int = 1
    rope_in_cache: bool = False  # flashmla: the rope part is the cache's own bf16 rope
    unsupported: Optional[str] = None

    def describe(self) -> str:
        return self.facts.describe()


@dataclass(frozen=True)
class SiteDims:
    d_parts: tuple[int, ...]  # widths of the query/key feature parts, latent first
    d_v: int
    heads: int
    h_kv: int
    topk: str
    batch: str
    s_q: str
    s_kv: str

    @property
    def d_qk(self) -> int:
        return sum(self.d_parts)

    def describe(self) -> str:
        parts = "+".join(str(d) for d in self.d_parts)
        return (
            f"d_qk {self.d_qk} ({parts}), d_v {self.d_v}, heads {self.heads}, h_kv {self.h_kv}, "
            f"topk {self.topk}, batch {self.batch}, s_q {self.s_q}, s_kv {self.s_kv}"
        )


@dataclass(frozen=True)
class MatchedSite:
    """One MLA attention found in a graph, ready to be replaced by one canonical op call."""

    anchor: torch.fx.Node  # the softmax
    graph_name: str  # "" for the top graph, the submodule name for higher-order-op bodies
    source: str  # user file:line and code
    form: str  # "index-mask" (dense scores + scatter mask) or "gather" (keys gathered by index)
    q_parts: tuple[Operand, ...]
    kv_parts: tuple[Operand, ...]
    value: Operand
    indices: Operand
    index_semantics: str  # "scatter" | "python-index" | "gather"
    indices_unique: bool  # proven unique (topk); otherwise duplicates are dropped at run time
    masks: tuple[MaskTerm, ...]
    scale: float  # constant factor of the softmax scale
    scale_factors: tuple  # (node, +1 | -1): Python numbers Dynamo kept symbolic, multiplied or divided in
    scale_text: str
    output: Operand
    output_dtype: Any
    compute_dtype: Any
    dims: SiteDims
    sizes: dict  # role -> SizeWitness
    region: frozenset  # nodes replaced by the op (erased once the output is rewired)
    storage: dict = field(default_factory=dict)  # input name -> StorageFacts
    notes: tuple[str, ...] = ()
    fp8: Optional[Fp8Latent] = None  # the key latent is FP8 storage (see Fp8Latent)


@dataclass(frozen=True)
class Rejection:
    """A softmax that looked like attention but was not lowered, and why."""

    anchor: torch.fx.Node
    graph_name: str
    source: str
    reason: str
    check: str  # short name of the check that failed


@dataclass(frozen=True)
class NearMiss:
    """An attention-like cluster with no softmax anchor (a hand-written softmax, say)."""

    node: torch.fx.Node
    graph_name: str
    source: str
    reason: str


@dataclass(frozen=True)
class KernelChoice:
    name: str  # "reference", "triton", ...
    reason: str


@dataclass
class SiteReport:
    """What the report keeps of a site once the graph moved on (no live FX nodes)."""

    index: int
    graph_name: str
    source: str
    form: str
    dims: str
    scale: str
    kernel: str
    kernel_reason: str
    masks: list[str]
    notes: list[str]
    storage: dict
    fp8: str = "no FP8 inputs"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RejectionReport:
    graph_name: str
    source: str
    check: str
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class NearMissReport:
    graph_name: str
    source: str
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompileReport:
    """Everything the backend learned about one compiled graph (one frame, one recompile)."""

    compile_id: str
    attempt: int = 0
    sites: list[SiteReport] = field(default_factory=list)
    rejections: list[RejectionReport] = field(default_factory=list)
    near_misses: list[NearMissReport] = field(default_factory=list)
    fp8_downgrades: list[NearMissReport] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    fp8_values: list[dict] = field(default_factory=list)  # intermediates held as FP8 storage
    failures: list[str] = field(default_factory=list)
    inner: str = ""
    dump_folder: str = ""

    def as_dict(self) -> dict:
        return {
            "compile_id": self.compile_id,
            "attempt": self.attempt,
            "inner": self.inner,
            "sites": [s.as_dict() for s in self.sites],
            "rejections": [r.as_dict() for r in self.rejections],
            "near_misses": [n.as_dict() for n in self.near_misses],
            "fp8_downgrades": [n.as_dict() for n in self.fp8_downgrades],
            "inputs": self.inputs,
            "fp8_values": self.fp8_values,
            "failures": self.failures,
        }
