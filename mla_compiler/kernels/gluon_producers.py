"""The producer partition of the warp-specialized sparse MLA forward: it gathers each key block's
rows into a ring slot as bf16 (bf16 keys by asynchronous copies; an FP8 latent staged in the slot,
or through registers, then dequantized; with FOLD_SCALE widened to f16 unscaled, its row scales
stored beside it) and hands the slot to the consumers."""

from __future__ import annotations

from .gluon_common import HAVE_GLUON

if HAVE_GLUON:
    from .gluon_common import (
        D_LAT,
        D_ROPE,
        _program_coords,
        _slot_chunk,
        async_copy,
        async_rows,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        partition_barrier,
        smem_view,
    )

    # The FP8 producers' copies of a chunk's rows: 16-byte vectors, 16 e4m3 values a thread.
    COPY_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))
    # The in-slot FP8 producer's dequantization, [64 rows, 128 columns] of a chunk: the copies'
    # rows (COPY_LAYOUT) and 16 values a thread, as two runs of 8
    # columns 64 apart, so each 8-lane phase of a bf16 tile store fills one 128-byte row of a
    # swizzle slab (no bank conflicts). The copies' own layout (one run of 16) put each phase's 8
    # stores on 4 bank groups twice. H200, V3.2 decode at 128 heads (RESULTS.md, eleventh call
    # set): FlashMLA layout 0.262 -> 0.250 ms, row scale 0.231 -> 0.221; 8 values a thread with 16
    # lanes a row (other rows, read again for the scales) 0.299 / 0.247.
    DEQUANT_LAYOUT = gl.constexpr(gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 64], [16, 0], [32, 0]],
                                                             lane_bases=[[0, 8], [0, 16], [0, 32], [1, 0], [2, 0]],
                                                             warp_bases=[[4, 0], [8, 0]], block_bases=[], shape=[64, 128]))

    @gluon.jit
    def _dequant_store(dst, raw, sc, FOLD_SCALE: gl.constexpr):
        """A 128-column chunk of the FP8 rows, times its scales (per row) in fp32, into ``dst`` (the
        slot's chunk) as bf16. (The product in bf16, exact for power-of-two scales, measured slower:
        0.47 vs 0.31 ms.) FOLD_SCALE: the e4m3 values as f16, unscaled (exact; one conversion per
        two values), the scale is applied to the scores and P."""
        if FOLD_SCALE:
            dst.store(raw.to(gl.float16))
        else:
            dst.store((raw.to(gl.float32) * sc[:, None]).to(gl.bfloat16))

    @gluon.jit
    def _row_scales_store(sc_ring, slot, sc, FOLD_SCALE: gl.constexpr):
        """FOLD_SCALE: the block's row scales (0 for invalid rows) beside its rows, for the consumers.
        Stored after the rows' copies are issued (staged in the slot: after they land), so the
        scales' loads have the copies' time."""
        if FOLD_SCALE:
            sc_ring.index(slot).store(sc)

    @gluon.jit
    def _producer(
        k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty,
        KV, KV_SCALE, KV_ROPE, IDX,
        stride_kvs, stride_ss, stride_rs, stride_it,
        S_KV, TOPK, H,
        FP8: gl.constexpr, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IN_SLOT: gl.constexpr,
        CHUNKED: gl.constexpr, CHUNK_BUFFERS: gl.constexpr, FOLD_SCALE: gl.constexpr,
    ):
        """Gathers each key block's rows into a ring slot as bf16 (bf16 keys by asynchronous copies;
        an FP8 latent staged in the slot or through registers, then dequantized, or with FOLD_SCALE
        widened to f16 unscaled). The slot's four 128-column chunks: see _slot_chunk."""
        n_blocks = gl.cdiv(TOPK, BLOCK_N)
        t, _ = _program_coords(H)
        # The host checks these (FlashMLA's 656-byte rows put the rope at stride 328 elements).
        stride_rs = gl.multiple_of(stride_rs, 8)
        stride_kvs = gl.multiple_of(stride_kvs, 16)
        idx_row = IDX + t * stride_it
        if FP8:
            if IN_SLOT:
                _producer_fp8_in_slot(k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row,
                                      stride_kvs, stride_ss, stride_rs, S_KV, TOPK, n_blocks, N_TILES, BLOCK_N, STAGES, CHUNKED,
                                      CHUNK_BUFFERS, FOLD_SCALE)
            else:
                _producer_fp8(k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row,
                              stride_kvs, stride_ss, stride_rs, S_KV, TOPK, n_blocks, N_TILES, BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS,
                              FOLD_SCALE)
        else:
            _producer_bf16(k0, k1, k2, k3, r_ring, ok_ring, full, empty, KV, KV_ROPE, idx_row, stride_kvs, stride_rs, S_KV, TOPK,
                           n_blocks, BLOCK_N, STAGES, CHUNKED, CHUNK_BUFFERS)

    @gluon.jit
    def _row_ptrs(BASE, rows, cols, stride, WIDTH: gl.constexpr):
        """Pointers to columns ``cols`` of rows ``rows`` (widened to int64) of a row-major operand.
        Pointers passed into a partition lose the launch's alignment facts: restate them (16-byte
        aligned rows; the host checks) so loads and copies move 16 bytes at a time."""
        ptr = BASE + rows.to(gl.int64)[:, None] * stride + cols[None, :]
        return gl.max_contiguous(gl.multiple_of(ptr, [16, 16]), [1, WIDTH])

    @gluon.jit
    def _rope_rows(r_slot, KV_ROPE, rows, stride_rs, rope_layout: gl.constexpr):
        """Starts the asynchronous copy of the block's rope rows (bf16 in every layout; rows -1 copy
        nothing and are zero-filled; the consumers mask those keys)."""
        rows = gl.convert_layout(rows, gl.SliceLayout(1, rope_layout))
        rope_ptr = _row_ptrs(KV_ROPE, rows, gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, rope_layout)), stride_rs, D_ROPE)
        async_rows(r_slot, rope_ptr, mask=(rows >= 0)[:, None])

    @gluon.jit
    def _chunk_ready(full, slot, c: gl.constexpr, CHUNKED: gl.constexpr):
        """With CHUNKED: 128-column chunk c of the slot is in place (its generic-proxy writes made
        visible to the MMAs' async proxy), so the consumers' scores over it may start."""
        if CHUNKED:
            fence_async_shared()
            partition_barrier()
            mbarrier.arrive(full.index(slot * 4 + c))

    @gluon.jit
    def _hand_over(full, slot, COPIES_PENDING: gl.constexpr = True):
        """Waits for this block's copies (COPIES_PENDING: a wait is followed by a compiler-inserted
        barrier, so skip it where they have landed), makes the generic-proxy writes visible to the
        MMAs' async proxy, and marks the slot full (one arrive after every producer warp is done)."""
        if COPIES_PENDING:
            async_copy.wait_group(0)
        fence_async_shared()
        partition_barrier()
        mbarrier.arrive(full.index(slot))

    @gluon.jit
    def _slot_done(full, slot, CHUNKED: gl.constexpr, COPIES_PENDING: gl.constexpr = True):
        """The slot's last chunk is in place: its hand-over (CHUNKED: the last chunk's barrier)."""
        if CHUNKED:
            _chunk_ready(full, slot, 3, CHUNKED)
        else:
            _hand_over(full, slot, COPIES_PENDING)

    @gluon.jit
    def _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N: gl.constexpr, row_layout: gl.constexpr):
        """Block i's key rows, -1 where the index is invalid (-1, >= S_KV, past top-k), in the
        indices' dtype (int32 from the model's top-k: half the registers of int64 where rows are
        held across blocks); widened to int64 before any stride multiply."""
        return _valid_rows(_block_indices(idx_row, i, TOPK, BLOCK_N, row_layout), S_KV)

    @gluon.jit
    def _valid_rows(idx, S_KV):
        """Indices as key rows: -1 where invalid (-1, >= S_KV; past top-k they read -1)."""
        return gl.where((idx >= 0) & (idx < S_KV), idx, -1)

    @gluon.jit
    def _block_indices(idx_row, i, TOPK, BLOCK_N: gl.constexpr, row_layout: gl.constexpr):
        """Block i's indices as stored (-1 past top-k): the load alone, so a caller can read them a
        block early and wait on their value only where it uses them."""
        offs = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_layout)
        return gl.load(idx_row + offs, mask=offs < TOPK, other=-1)

    @gluon.jit
    def _producer_bf16(k0, k1, k2, k3, r_ring, ok_ring, full, empty, KV, KV_ROPE, idx_row, stride_kvs, stride_rs, S_KV, TOPK,
                       n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CHUNKED: gl.constexpr, CHUNK_BUFFERS: gl.constexpr):
        """bf16 keys: every part of a block by asynchronous copies, issued once its slot is free
        (CHUNKED: one copy group per 128 columns, each handed over as it lands; CHUNK_BUFFERS: one
        copy per 128-column chunk buffer)."""
        b16_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.arange(0, 256, layout=gl.SliceLayout(0, b16_layout))
        cols128 = gl.arange(0, 128, layout=gl.SliceLayout(0, b16_layout))
        for i in range(n_blocks):
            slot = i % STAGES
            rows = _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N, gl.SliceLayout(1, b16_layout))
            valid = rows >= 0
            if not (CHUNKED or CHUNK_BUFFERS):
                base = _row_ptrs(KV, rows, cols, stride_kvs, 256)  # before the wait: overlaps it
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            ok_ring.index(slot).store(valid.to(gl.int32))
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            if CHUNKED or CHUNK_BUFFERS:
                base128 = _row_ptrs(KV, rows, cols128, stride_kvs, 128)
                for c in gl.static_range(4):
                    async_rows(_slot_chunk(k0, k1, k2, k3, slot, c, CHUNK_BUFFERS), base128 + c * 128, mask=valid[:, None])
                    if CHUNKED:
                        async_copy.commit_group()
                if CHUNKED:
                    # Groups complete in order: chunk c (the rope with the first) once 3 - c remain.
                    async_copy.wait_group(3)
                    _chunk_ready(full, slot, 0, CHUNKED)
                    async_copy.wait_group(2)
                    _chunk_ready(full, slot, 1, CHUNKED)
                    async_copy.wait_group(1)
                    _chunk_ready(full, slot, 2, CHUNKED)
                    async_copy.wait_group(0)
                    _chunk_ready(full, slot, 3, CHUNKED)
                else:
                    async_copy.commit_group()
                    _hand_over(full, slot)
            else:
                k_slot = k0.index(slot)
                async_rows(k_slot.slice(0, 256, dim=1), base, mask=valid[:, None])
                async_rows(k_slot.slice(256, 256, dim=1), base + 256, mask=valid[:, None])
                async_copy.commit_group()
                _hand_over(full, slot)

    @gluon.jit
    def _producer_fp8(k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row, stride_kvs, stride_ss,
                      stride_rs, S_KV, TOPK, n_blocks, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      CHUNKED: gl.constexpr, CHUNK_BUFFERS: gl.constexpr, FOLD_SCALE: gl.constexpr):
        """FP8 latent, one block at a time: its four 128-column chunks are loaded into registers
        (issued before the slot is free), then dequantized into the slot as bf16 (FOLD_SCALE: f16,
        unscaled). The next block's loads start only after this block is stored."""
        CHUNK: gl.constexpr = 128
        fp8_layout: gl.constexpr = COPY_LAYOUT
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, fp8_layout))
        for i in range(n_blocks):
            slot = i % STAGES
            rows = _block_rows(idx_row, i, S_KV, TOPK, BLOCK_N, gl.SliceLayout(1, fp8_layout))
            valid = rows >= 0
            base = _row_ptrs(KV, rows, cols, stride_kvs, CHUNK)
            sc_ptr = KV_SCALE + rows.to(gl.int64) * stride_ss
            sc0, sc1, sc2, sc3 = _scale_loads(sc_ptr, valid, N_TILES)
            raw0 = gl.load(base, mask=valid[:, None], other=0.0)
            raw1 = gl.load(base + CHUNK, mask=valid[:, None], other=0.0)
            raw2 = gl.load(base + 2 * CHUNK, mask=valid[:, None], other=0.0)
            raw3 = gl.load(base + 3 * CHUNK, mask=valid[:, None], other=0.0)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            async_copy.commit_group()
            ok_ring.index(slot).store(valid.to(gl.int32))
            if CHUNKED:
                async_copy.wait_group(0)  # the rope goes with the first chunk
            _row_scales_store(sc_ring, slot, sc0, FOLD_SCALE)
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 0, CHUNK_BUFFERS), raw0, sc0, FOLD_SCALE)
            _chunk_ready(full, slot, 0, CHUNKED)
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 1, CHUNK_BUFFERS), raw1, sc1, FOLD_SCALE)
            _chunk_ready(full, slot, 1, CHUNKED)
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 2, CHUNK_BUFFERS), raw2, sc2, FOLD_SCALE)
            _chunk_ready(full, slot, 2, CHUNKED)
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 3, CHUNK_BUFFERS), raw3, sc3, FOLD_SCALE)
            _slot_done(full, slot, CHUNKED)

    @gluon.jit
    def _scale_loads(sc_ptr, valid, N_TILES: gl.constexpr):
        """The four chunks' scales of a block's rows (one per 128 columns, or the row's one four times)."""
        sc0 = gl.load(sc_ptr, mask=valid, other=0.0)
        if N_TILES == 4:
            sc1 = gl.load(sc_ptr + 1, mask=valid, other=0.0)
            sc2 = gl.load(sc_ptr + 2, mask=valid, other=0.0)
            sc3 = gl.load(sc_ptr + 3, mask=valid, other=0.0)
        else:
            sc1 = sc0
            sc2 = sc0
            sc3 = sc0
        return sc0, sc1, sc2, sc3

    @gluon.jit
    def _raw_pair(k2, k3, slot, pair: gl.constexpr, BLOCK_N: gl.constexpr):
        """CHUNK_BUFFERS: raw (e4m3) chunks 2 pair and 2 pair + 1 of the slot's rows, staged in bf16
        chunk buffer 2 + pair as 256 byte columns."""
        raw_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        return smem_view(_slot_chunk(k2, k3, k2, k3, slot, pair, True), gl.float8e4nv, [BLOCK_N, 256], raw_layout)

    @gluon.jit
    def _raw_chunk(k0, k1, k2, k3, slot, g: gl.constexpr, BLOCK_N: gl.constexpr, CHUNK_BUFFERS: gl.constexpr):
        """Where raw (e4m3) chunk g of the slot's rows is staged: the upper half of the slot's latent
        bytes, raw chunks 0-1 where bf16 chunk 2 goes and 2-3 where bf16 chunk 3 goes."""
        raw_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        if CHUNK_BUFFERS:
            view = _raw_pair(k2, k3, slot, g // 2, BLOCK_N).slice((g % 2) * 128, 128, dim=1)
        else:
            # The slot's 64 KiB of latent as 1024 byte columns; the upper 512 hold the raw rows.
            view = smem_view(k0.index(slot), gl.float8e4nv, [BLOCK_N, 2 * D_LAT], raw_layout).slice(D_LAT + g * 128, 128, dim=1)
        return view

    @gluon.jit
    def _producer_fp8_in_slot(k0, k1, k2, k3, r_ring, ok_ring, sc_ring, full, empty, KV, KV_SCALE, KV_ROPE, idx_row, stride_kvs,
                              stride_ss, stride_rs, S_KV, TOPK, n_blocks, N_TILES: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CHUNKED: gl.constexpr, CHUNK_BUFFERS: gl.constexpr, FOLD_SCALE: gl.constexpr):
        """FP8 latent staged in the slot itself: the raw bytes are copied asynchronously (no
        registers held while in flight) into the upper half of the slot's latent bytes, then
        dequantized in place, chunk by chunk, into the bf16 tile (FOLD_SCALE: an f16 tile, unscaled). A 128-column chunk g of bf16 is
        bytes [16K g, 16K (g+1)) of the slot (128-byte swizzle slabs, 64 rows each); raw chunk g
        is bytes [32K + 8K g, 32K + 8K (g+1)). Chunks 0 and 1 write below the raw bytes; chunk 2
        overwrites raw chunks 0 and 1 (read by then: a barrier); chunk 3 overwrites raw chunks 2 and
        3 (chunk 3 read into registers first, then a barrier). With CHUNK_BUFFERS the same bytes are
        four buffers (raw chunks 0-1 in chunk buffer 2, 2-3 in buffer 3): the stores into chunks 0
        and 1 then need no compiler-inserted barrier between them (see _four_buffers)."""
        CHUNK: gl.constexpr = 128
        fp8_layout: gl.constexpr = COPY_LAYOUT
        # The dequantization: DEQUANT_LAYOUT with chunk buffers (timed as the FP8 default; the
        # other chunk-buffer launches take it untimed). The one-ring form keeps the copies' layout.
        if CHUNK_BUFFERS:
            dq_layout: gl.constexpr = DEQUANT_LAYOUT
        else:
            dq_layout: gl.constexpr = fp8_layout
        rope_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        row_layout: gl.constexpr = gl.SliceLayout(1, fp8_layout)
        dq_rows: gl.constexpr = gl.SliceLayout(1, dq_layout)  # the same rows a thread as row_layout
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, fp8_layout))
        cols_pair = gl.arange(0, 2 * CHUNK, layout=gl.SliceLayout(0, fp8_layout))
        idx_next = _block_indices(idx_row, 0, TOPK, BLOCK_N, row_layout)
        for i in range(n_blocks):
            slot = i % STAGES
            rows = _valid_rows(idx_next, S_KV)
            # Read one block ahead and first used a block later. Checked as rows right after the
            # load, every block's copies waited for it: with the folded row scale (the producer's
            # conversion then short) 0.212 -> 0.196 ms at the V3.2 decode shape on H200.
            idx_next = _block_indices(idx_row, i + 1, TOPK, BLOCK_N, row_layout)
            valid = rows >= 0
            sc0, sc1, sc2, sc3 = _scale_loads(KV_SCALE + rows.to(gl.int64) * stride_ss, valid, N_TILES)
            # The same rows a thread in both layouts: a renaming of registers.
            sc0, sc1 = gl.convert_layout(sc0, dq_rows), gl.convert_layout(sc1, dq_rows)
            sc2, sc3 = gl.convert_layout(sc2, dq_rows), gl.convert_layout(sc3, dq_rows)
            if not CHUNK_BUFFERS:
                base = _row_ptrs(KV, rows, cols, stride_kvs, CHUNK)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            ok_ring.index(slot).store(valid.to(gl.int32))
            _rope_rows(r_ring.index(slot), KV_ROPE, rows, stride_rs, rope_layout)
            # Invalid rows copy nothing and are zero-filled (no stale byte can read as NaN).
            if CHUNK_BUFFERS:
                # One copy per buffer: two copies into one buffer get a barrier between them.
                base_pair = _row_ptrs(KV, rows, cols_pair, stride_kvs, 2 * CHUNK)
                async_rows(_raw_pair(k2, k3, slot, 0, BLOCK_N), base_pair, mask=valid[:, None])
                async_rows(_raw_pair(k2, k3, slot, 1, BLOCK_N), base_pair + 2 * CHUNK, mask=valid[:, None])
            else:
                for g in gl.static_range(4):
                    async_rows(_raw_chunk(k0, k1, k2, k3, slot, g, BLOCK_N, CHUNK_BUFFERS), base + g * CHUNK, mask=valid[:, None])
            async_copy.commit_group()
            async_copy.wait_group(0)
            partition_barrier()  # every producer thread's copies have landed
            _row_scales_store(sc_ring, slot, sc0, FOLD_SCALE)  # here: the scales' loads had the copies' time
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 0, CHUNK_BUFFERS),
                           _raw_chunk(k0, k1, k2, k3, slot, 0, BLOCK_N, CHUNK_BUFFERS).load(dq_layout), sc0, FOLD_SCALE)
            _chunk_ready(full, slot, 0, CHUNKED)
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 1, CHUNK_BUFFERS),
                           _raw_chunk(k0, k1, k2, k3, slot, 1, BLOCK_N, CHUNK_BUFFERS).load(dq_layout), sc1, FOLD_SCALE)
            # Raw chunks 0 and 1 are read: chunk 2 may overwrite them (CHUNKED: its hand-over's barrier).
            if CHUNKED:
                _chunk_ready(full, slot, 1, CHUNKED)
            else:
                partition_barrier()
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 2, CHUNK_BUFFERS),
                           _raw_chunk(k0, k1, k2, k3, slot, 2, BLOCK_N, CHUNK_BUFFERS).load(dq_layout), sc2, FOLD_SCALE)
            last = _raw_chunk(k0, k1, k2, k3, slot, 3, BLOCK_N, CHUNK_BUFFERS).load(dq_layout)
            # Raw chunks 2 and 3 are read: chunk 3 may overwrite them.
            if CHUNKED:
                _chunk_ready(full, slot, 2, CHUNKED)
            else:
                partition_barrier()
            _dequant_store(_slot_chunk(k0, k1, k2, k3, slot, 3, CHUNK_BUFFERS), last, sc3, FOLD_SCALE)
            # Every copy landed before the conversion (CHUNK_BUFFERS: the hand-over skips the wait).
            _slot_done(full, slot, CHUNKED, not CHUNK_BUFFERS)
