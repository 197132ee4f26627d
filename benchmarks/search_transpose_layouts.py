"""Searches register layouts for the FP8-products kernel's transpose of a [64 keys, 128 columns]
e4m3 chunk (gluon_fp8_mma.TRANSPOSE_LAYOUT): read from the key rows (128-byte swizzle), written
into the transposed tile, either two [512, 32] tiles (32-byte swizzle) or one [512, 64] tile
(64-byte swizzle). Every layout whose bases move in one dimension, with 4-byte or wider runs both
ways (key bits 0-1 and column bits 0-1 in registers), 4 warps; prints the fewest shared wavefronts
a warp takes (loads + stores) under Hopper's bank rules. CPU only, about a minute and a half.

    python benchmarks/search_transpose_layouts.py
"""

import itertools

KEY_BITS, COL_BITS = 6, 7
BITS = [("k", i) for i in range(KEY_BITS)] + [("c", i) for i in range(COL_BITS)]


def key_rows(key, col):  # 128-byte rows, 128-byte swizzle (16-byte units XOR row % 8)
    return key * 128 + (((col >> 4) ^ (key & 7)) << 4) + (col & 15)


def two_tiles(key, col):  # two [512, 32] tiles, 32-byte swizzle (units XOR (row / 4) % 2)
    half, k = key >> 5, key & 31
    return half * 65536 + col * 32 + (((k >> 4) ^ ((col >> 2) & 1)) << 4) + (k & 15)


def one_tile(key, col):  # one [512, 64] tile, 64-byte swizzle (units XOR (row / 2) % 4)
    return col * 64 + (((key >> 4) ^ ((col >> 1) & 3)) << 4) + (key & 15)


def wavefronts(regs, lanes, address, vector_dim):
    """A warp's wavefronts: per instruction and lane phase, the most distinct words one bank serves."""
    n = 0
    while n < 4 and (vector_dim, n) in regs:
        n += 1
    vec, other = 1 << n, [b for b in regs if not (b[0] == vector_dim and b[1] < n)]
    lanes_at_once = {1: 32, 2: 32, 4: 32, 8: 16, 16: 8}[vec]
    total = 0
    for r in range(1 << len(other)):
        starts = []
        for lane in range(32):
            set_bits = [b for j, b in enumerate(other) if r >> j & 1] + [b for j, b in enumerate(lanes) if lane >> j & 1]
            key = sum(1 << i for d, i in set_bits if d == "k")
            col = sum(1 << i for d, i in set_bits if d == "c")
            starts.append(address(key, col))
        for g in range(0, 32, lanes_at_once):
            banks = {}
            for a in starts[g:g + lanes_at_once]:
                for w in range(max(1, vec // 4)):
                    banks.setdefault((a // 4 + w) % 32, set()).add(a // 4 + w)
            total += max(len(words) for words in banks.values())
    return total


def main() -> None:
    runs = {("k", 0), ("k", 1), ("c", 0), ("c", 1)}
    found = []
    for extra in itertools.combinations([b for b in BITS if b not in runs], 2):
        regs = runs | set(extra)
        rest = [b for b in BITS if b not in regs]
        for warps in itertools.combinations(rest, 2):
            lane_bits = [b for b in rest if b not in warps]
            for top in itertools.permutations(lane_bits, 2):  # the top lane bits split the phases
                lanes = [b for b in lane_bits if b not in top] + [top[1], top[0]]
                loads = wavefronts(regs, lanes, key_rows, "c")
                for name, tile in (("two [512, 32] tiles", two_tiles), ("one [512, 64] tile", one_tile)):
                    stores = wavefronts(regs, lanes, lambda k, c: tile(k, c), "k")
                    found.append((loads + stores, loads, stores, name, sorted(regs), lanes, list(warps)))
    found.sort(key=lambda f: f[0])
    ideal = 64 * 128 // 4 // 128  # a warp's quarter of the chunk, once each way
    print(f"ideal: {ideal} wavefronts a warp each way")
    for name in ("two [512, 32] tiles", "one [512, 64] tile"):
        best = next(f for f in found if f[3] == name)
        print(f"{name}: loads {best[1]} + stores {best[2]}; registers {best[4]}, lanes {best[5]}, warps {best[6]}")


if __name__ == "__main__":
    main()
