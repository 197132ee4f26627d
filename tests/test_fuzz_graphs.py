"""Fuzzed MLA-like graphs: compiled equals eager, and a site is matched if and only if it is sparse MLA.

Hypothesis draws recipes (tests/fuzz_modules.py): widths, heads, top-k, batch, dtype, selections
(scatter masks, where, masked_fill, three gathers), causal masks, scale placements, softmax and
product spellings, duplicate indices, and near misses. CI runs a fixed, derandomized set;
``MLA_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_graphs.py`` runs a longer search. Failing recipes
hypothesis found are kept below as ``@example``s.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from fuzz_modules import (
    GATHER_PRODUCTS,
    GATHER_SELECTIONS,
    MASK_ONLY_MISSES,
    MASK_PRODUCTS,
    MASK_SELECTIONS,
    MISSES,
    SCALES,
    SOFTMAXES,
    VALUE_PRODUCTS,
    Recipe,
    build,
)
from mla_compiler import make_backend

EXAMPLES = int(os.environ.get("MLA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 150,
    deadline=None,
    derandomize=not EXAMPLES,  # CI: the same examples every run; a longer search explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@st.composite
def recipes(draw, miss: bool) -> Recipe:
    gathers = draw(st.booleans())
    select = draw(st.sampled_from(GATHER_SELECTIONS if gathers else MASK_SELECTIONS))
    s = draw(st.integers(2, 7))
    t_extra = draw(st.integers(0, 4))
    topk = draw(st.integers(1, min(7, s + t_extra)))
    if gathers:  # a top-k of 1 with gathered keys is rejected (a unit softmax axis): see below
        topk = max(topk, 2)
    misses = MISSES if not gathers else tuple(m for m in MISSES if m not in MASK_ONLY_MISSES)
    drawn_miss = draw(st.sampled_from(misses)) if miss else None
    if drawn_miss == "selection_on_queries":  # the keys-first mask broadcasts only when s == t
        t_extra, topk = 0, min(topk, s)
    return Recipe(
        b=draw(st.integers(1, 3)),
        s=s,
        t_extra=t_extra,
        h=draw(st.sampled_from([1, 2, 3, 5, 8])),
        d_lat=draw(st.sampled_from([8, 16, 24, 40])),
        d_rope=draw(st.sampled_from([0, 4, 8, 16])),
        topk=topk,
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        select=select,
        product=draw(st.sampled_from(GATHER_PRODUCTS if gathers else MASK_PRODUCTS)),
        causal=False if gathers else draw(st.booleans()),
        scale_at=draw(st.sampled_from(SCALES)),
        softmax=draw(st.sampled_from(SOFTMAXES)),
        value=draw(st.sampled_from(VALUE_PRODUCTS)),
        duplicates=draw(st.booleans()),
        miss=drawn_miss,
        seed=draw(st.integers(0, 2**16)),
    )


def compile_and_compare(r: Recipe):
    torch._dynamo.reset()
    fn, args = build(r)
    reports = []
    compiled = torch.compile(fn, backend=make_backend(inner="eager", strict=True, on_report=reports.append), fullgraph=True)
    got = compiled(*args)
    want = fn(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    if r.is_sparse_mla:
        assert not want.isnan().any(), f"the recipe itself produced NaN: {r}"
        # The kernel accumulates in fp32; eager bf16 rounds scores and probabilities to bf16.
        tol = 1e-5 if r.dtype == "float32" else 3e-2
        assert rel_err(got, want) < tol, r
    else:
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)  # the graph as written
    sites = [s for g in reports for s in g.sites]
    said_why = [x for g in reports for x in (*g.rejections, *g.near_misses)]
    return sites, said_why


@settings(FUZZ)
@given(recipes(miss=False))
@example(Recipe())
@example(Recipe(select="gather_flat_invalid", product="bmm", d_rope=0, h=1, topk=5, s=3, t_extra=2))
# Found by hypothesis: a boolean selection under where, and the value read as cat's first piece.
@example(Recipe(select="scatter_where", product="matmul_heads_first", causal=True, scale_at="mul_after_mask", softmax="positive_dim", value="matmul", duplicates=True, dtype="bfloat16"))
# Found by hypothesis: a top-k of one (a unit slot axis), and a gathered no-rope latent.
@example(Recipe(b=1, s=2, h=1, d_lat=8, d_rope=0, topk=1))
@example(Recipe(b=1, s=2, h=1, d_lat=8, d_rope=0, topk=2, select="gather_index"))
# Boolean selections through a transpose or a squeeze before the mask is applied.
@example(Recipe(select="keys_first_transposed", causal=True, t_extra=2, product="matmul_heads_first"))
@example(Recipe(select="squeezed", product="bmm", dtype="bfloat16"))
def test_sparse_mla_recipes_are_matched_and_compiled_exactly(r):
    sites, said_why = compile_and_compare(r)
    assert len(sites) == 1, f"not matched: {r}; said: {said_why}"
    assert not said_why, f"{r}: {said_why}"


@settings(FUZZ)
@given(recipes(miss=True))
@example(Recipe(miss="mask_keeps_unselected"))
@example(Recipe(miss="softcap", select="torch_gather"))
@example(Recipe(miss="selection_on_queries", select="keys_first_transposed", product="matmul_heads_first"))
def test_near_misses_are_left_alone_and_explained(r):
    sites, said_why = compile_and_compare(r)
    assert not sites, f"a near miss was lowered: {r}: {sites[0].source if sites else ''}"
    assert said_why, f"{r}: rejected without a reason"


@pytest.mark.parametrize("miss", MISSES)
def test_every_near_miss_kind_is_rejected(miss):
    """Each near-miss kind at least once, whatever the fuzzer drew."""
    select = "scatter_add" if miss in MASK_ONLY_MISSES else "gather_index"
    for sel in {select, "scatter_add"}:
        sites, said_why = compile_and_compare(Recipe(miss=miss, select=sel))
        assert not sites and said_why, (miss, sel)


def test_a_selection_transposed_onto_the_query_axis_is_rejected_with_the_reason():
    """The walk through layout ops checks axes, not spellings: a keys-first selection used without
    transposing it back selects along the queries, and is refused."""
    import fuzz_modules as fm

    class Misaligned(torch.nn.Module):
        def forward(self, q, kv, idx):  # s == t: the shapes broadcast, the axes do not line up
            b, s, h, _ = q.shape
            t = kv.size(1)
            scores = torch.einsum("bshd,btd->bsht", q, kv)
            sel = torch.zeros(b, t, s, dtype=torch.bool).scatter(1, idx.transpose(1, 2), True)
            scores = scores.masked_fill(~sel.unsqueeze(2), fm.NEG_INF)
            return torch.einsum("bsht,btd->bshd", scores.softmax(-1), kv)

    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(4)]).unsqueeze(0)
    reports = []
    backend = make_backend(inner="eager", on_report=reports.append)
    got = torch.compile(Misaligned(), backend=backend, fullgraph=True)(q, kv, idx)
    torch.testing.assert_close(got, Misaligned()(q, kv, idx), equal_nan=True)
    assert not [s for r in reports for s in r.sites]
    reasons = " ".join(x.reason for r in reports for x in (*r.rejections, *r.near_misses))
    assert "another axis" in reasons, reasons


def test_top_k_of_one_with_gathered_keys_is_rejected_with_the_reason():
    sites, said_why = compile_and_compare(Recipe(select="gather_index", topk=1))
    assert not sites
    assert "top-k of 1 is not supported" in said_why[0].reason


def test_a_slice_of_gathered_keys_is_rejected_with_the_reason():
    def sliced(q_lat, q_pe, kv_lat, k_pe, idx):
        d_lat = kv_lat.size(-1)
        keys = torch.cat([kv_lat, k_pe], -1)[torch.arange(idx.size(0))[:, None, None], idx]
        scores = torch.einsum("bshc,bskc->bshk", q_lat, keys[..., :d_lat]) + torch.einsum("bshr,bskr->bshk", q_pe, keys[..., d_lat:])
        return torch.einsum("bshk,bskc->bshc", (scores * 0.2).softmax(-1), keys[..., :d_lat])

    _, args = build(Recipe(select="gather_index"))
    reports = []
    torch.compile(sliced, backend=make_backend(inner="eager", on_report=reports.append))(*args)
    (rej,) = reports[0].rejections
    assert rej.check == "keys" and "slice of gathered keys" in rej.reason
