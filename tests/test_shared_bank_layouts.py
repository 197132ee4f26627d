"""The shared-memory layouts the FP8 kernels read and write through, checked for bank conflicts
and for agreeing on where each byte lives, by evaluating their linear layouts on the CPU (no
GPU, no compile). Hopper's shared memory has 32 banks of 4 bytes; a 16-byte access is served
8 lanes at a time, a 4-byte one a warp at a time: an access is conflict-free when those lanes
meet distinct banks. (Both layouts were measured on H200 with their conflicts and without:
RESULTS.md, eleventh call set.)"""

import functools
import subprocess
import sys

import pytest

from mla_compiler.kernels import gluon_fewhead as fh

pytestmark = pytest.mark.skipif(not fh.HAVE_GLUON, reason="this Triton has no Gluon dialect")


def _xor(bases, index):
    """The coordinates a linear layout gives ``index`` (bit i of it selects basis i)."""
    out = [0] * len(bases[0])
    for bit, basis in enumerate(bases):
        if index >> bit & 1:
            out = [a ^ b for a, b in zip(out, basis)]
    return tuple(out)


def _offsets(view):
    """{coordinates: byte offset} of a SharedLinearLayout over one byte a coordinate."""
    bases = view.offset_bases
    table = {_xor(bases, o): o for o in range(1 << len(bases))}
    assert len(table) == 1 << len(bases), "the view is not one-to-one"
    return table


def _distributed(layout, reg, lane, warp):
    return tuple(a ^ b ^ c for a, b, c in zip(_xor(layout.reg_bases, reg), _xor(layout.lane_bases, lane), _xor(layout.warp_bases, warp)))


def _conflicts(layout, offset_of, vector_bits: int, access_bytes: int) -> list:
    """Every access of ``layout`` (its first ``vector_bits`` register bits one vector of
    ``access_bytes``), as (instruction, lane group, banks met by two addresses) where a lane group
    meets a bank at two different addresses; [] when conflict-free. Lanes reading the same address
    share it (a broadcast). Also checks that each vector is contiguous and aligned."""
    assert access_bytes in (4, 8, 16), "shared accesses of 4, 8 or 16 bytes"
    lanes_at_once = {4: 32, 8: 16, 16: 8}[access_bytes]
    found = []
    for reg_hi in range(1 << (len(layout.reg_bases) - vector_bits)):
        for warp in range(1 << len(layout.warp_bases)):
            starts = []
            for lane in range(32):
                vec = [offset_of(_distributed(layout, (reg_hi << vector_bits) | r, lane, warp)) for r in range(1 << vector_bits)]
                step = access_bytes // len(vec)
                assert vec == list(range(vec[0], vec[0] + access_bytes, step)), "a vector's bytes are not contiguous"
                assert vec[0] % access_bytes == 0, "a vector is not aligned to its size"
                starts.append(vec[0])
            for g in range(0, 32, lanes_at_once):
                words = {s // 4 + w for s in set(starts[g:g + lanes_at_once]) for w in range(access_bytes // 4)}
                banks = [word % 32 for word in words]
                if len(set(banks)) != len(banks):
                    found.append((reg_hi, warp, g // lanes_at_once, sorted({b for b in banks if banks.count(b) > 1})))
    return found


@functools.lru_cache(maxsize=1)
def _linear_form_aborts() -> bool:
    """Whether asking this Triton for a layout's linear form outside a kernel kills the process
    (Triton 3.6 aborts on a failed assertion), tried once in a child process."""
    probe = ("from triton._C.libtriton import gluon_ir, ir\n"
             "from triton.experimental.gluon import language as gl\n"
             "c = ir.context(); ir.load_dialects(c); b = gluon_ir.GluonOpBuilder(c)\n"
             "b.to_linear_layout(gl.NVMMASharedLayout.get_default_for([64, 64], gl.float8e4nv)._to_ir(b), [64, 64])\n")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return True
    return done.returncode < 0 or b"Abort" in done.stderr


def _triton_linear(layout, shape):
    """Triton's own linear layout of ``layout`` over ``shape`` (skips where this Triton does not
    expose it outside a kernel)."""
    if _linear_form_aborts():
        pytest.skip("this Triton aborts when asked for a layout's linear form outside a kernel")
    try:
        from triton._C.libtriton import gluon_ir, ir

        context = ir.context()
        ir.load_dialects(context)
        builder = gluon_ir.GluonOpBuilder(context)
        return builder.to_linear_layout(layout._to_ir(builder), shape)
    except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - another Triton
        pytest.skip(f"this Triton does not give a layout's linear form outside a kernel ({exc})")


def _rega():
    from mla_compiler.kernels import gluon_fewhead_rega as rega

    return rega


def test_register_operand_views_agree_on_every_byte():
    # The copies write byte b of key row r where the K view reads (r, k) with _k_order(k) = b and
    # the V^T view reads (m, r) with _v_order(m) = b.
    from mla_compiler.kernels import gluon_fewhead_wgmma as wg

    rega = _rega()
    ring = _offsets(rega._RING_ROWS.value)
    k_view = _offsets(rega._K_VIEW.value)
    v_view = _offsets(rega._V_VIEW.value)
    for (row, byte), offset in ring.items():
        assert k_view[(row, next(k for k in range(128) if wg._k_order.fn(k) == byte))] == offset
        assert v_view[(next(m for m in range(128) if wg._v_order.fn(m) == byte), row)] == offset


def test_register_operand_reads_and_copies_are_conflict_free():
    from triton.experimental.gluon import language as gl

    rega = _rega()
    ring = _offsets(rega._RING_ROWS.value)
    k_view = _offsets(rega._K_VIEW.value)
    v_view = _offsets(rega._V_VIEW.value)
    assert _conflicts(rega._K_LOAD.value, k_view.__getitem__, 4, 16) == []  # LDS.128: 16 bytes of a run
    assert _conflicts(rega._V_LOAD.value, v_view.__getitem__, 2, 4) == []  # LDS.32: 4 bytes of a run
    # The copies (gluon_fewhead_rega._issue_rows: BlockedLayout([1, 16], [4, 8], [4, 1])) stay
    # whole aligned 16-byte runs through the ring's permutation. (Their 8-lane phases cover one
    # row each, so any permutation of a row's runs is conflict-free for them.)
    copy = _triton_linear(gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]), [64, 128])
    assert _conflicts(copy, ring.__getitem__, 4, 16) == []


def test_the_row_xor_swizzle_is_caught_with_conflicts_on_k_reads():
    # The swizzle this ring replaced (row & 7 XORed into the run): each K phase's two rows meet
    # the same 16 banks, as Nsight Compute measured (conflicts on 26 % of the load wavefronts).
    from triton.experimental.gluon import language as gl

    rega = _rega()
    xor_view = gl.SharedLinearLayout(offset_bases=[[0, 1], [0, 8], [0, 16], [0, 32], [0, 2], [0, 4], [0, 64],
                                                   [1, 2], [2, 4], [4, 64], [8, 0], [16, 0], [32, 0]])
    found = _conflicts(rega._K_LOAD.value, _offsets(xor_view).__getitem__, 4, 16)
    assert len(found) == 4 * 4 * 4  # every phase of every instruction


def _bf16_tile_offsets():
    """{(row, column): byte offset} of a [64, 128] bf16 tile in the layout the warpgroup MMAs read
    (NVMMASharedLayout, 128-byte swizzle), as Triton itself lays it out: 64-column slabs of
    128-byte rows, each row's 16-byte runs XORed with the row's low 3 bits."""
    from triton.experimental.gluon import language as gl

    tile = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    return {coords: 2 * offset for coords, offset in _offsets(_triton_linear(tile, [64, 128])).items()}


def test_fp8_producer_tile_stores_are_conflict_free_and_keep_the_copies_rows():
    from mla_compiler.kernels import gluon_producers as gp

    dequant = gp.DEQUANT_LAYOUT.value
    tile = _bf16_tile_offsets().__getitem__
    assert _conflicts(dequant, tile, 3, 16) == []  # STS.128: 8 bf16 values
    # The copies' layout (gluon_producers.COPY_LAYOUT): the conversion used to store from it.
    copies = _triton_linear(gp.COPY_LAYOUT.value, [64, 128])
    assert len(_conflicts(copies, tile, 3, 16)) == 8 * 4 * 4  # every phase of its 8 stores, each warp
    # The same rows a thread in both (the scales move by a renaming of registers).
    for lane in range(32):
        for warp in range(4):
            rows = [{_distributed(layout, r, lane, warp)[0] for r in range(64)} for layout in (dequant, copies)]
            assert rows[0] == rows[1]
