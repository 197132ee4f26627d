#!/usr/bin/env bash
# Nsight Compute's counters per source line and per SASS instruction (its source page, as CSV) of
# one sparse MLA forward launch (benchmarks/profile_driver.py: HEADS, LAYOUT, KERNEL, LAUNCH):
# which instructions make the shared-memory bank conflicts, the excessive global sectors and the
# stall samples. Writes $OUT/src_sass.csv (per SASS instruction) and
# $OUT/src_cuda.csv, and prints the instructions with the most excessive shared wavefronts.
OUT=$(realpath -m "${OUT:-.}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
rm -f /tmp/source_lines.ncu-rep
timeout 150 ncu --clock-control none -k regex:"fewhead|_ws_fwd|fp8_mma" --launch-skip 1 -c 1 --section SourceCounters --import-source yes -f -o /tmp/source_lines \
  python3 benchmarks/profile_driver.py > "$OUT/ncu_source_lines_run.txt" 2>&1
status=$?
echo "ncu exit $status"
if [ "$status" -ne 0 ] || [ ! -s /tmp/source_lines.ncu-rep ]; then
  tail -20 "$OUT/ncu_source_lines_run.txt"
  exit 1
fi
ncu -i /tmp/source_lines.ncu-rep --page source --csv --print-source cuda > "$OUT/src_cuda.csv" 2> "$OUT/src_err.txt"
ncu -i /tmp/source_lines.ncu-rep --page source --csv --print-source sass > "$OUT/src_sass.csv" 2>> "$OUT/src_err.txt"
tail -3 "$OUT/src_err.txt"
python3 - "$OUT/src_sass.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
cols = rows[1]
body = [r for r in rows[2:] if len(r) == len(cols)]
at = {c: i for i, c in enumerate(cols)}
def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0
for metric in ("L1 Wavefronts Shared Excessive", "Warp Stall Sampling (All Samples)"):
    k = at[metric]
    print(f"{metric}: {sum(num(r[k]) for r in body):.0f} over {len(body)} instructions; the most:")
    for r in sorted(body, key=lambda r: -num(r[k]))[:12]:
        print(f"  {num(r[k]):>10.0f}  shared ideal {num(r[at['L1 Wavefronts Shared Ideal']]):>9.0f}  {r[1].strip()[:90]}")
# Where the stall samples fall: runs of SASS instructions executed about once a program (a prologue
# or an epilogue: the commonest count, a partition's warps times the programs) or 8 times that and
# more (a loop), in address order. A warp-specialized kernel lays its partitions out one after
# another, each a once-loop-once run.
from collections import Counter
k, e = at["Warp Stall Sampling (All Samples)"], at["Instructions Executed"]
once = Counter(num(r[e]) for r in body if num(r[e]) > 0).most_common(1)[0][0]
runs = []
for i, r in enumerate(body):
    kind = "zero" if num(r[e]) == 0 else ("once" if num(r[e]) < 8 * once else "loop")
    if runs and runs[-1][0] == kind:
        runs[-1][2], runs[-1][3] = i, runs[-1][3] + num(r[k])
    else:
        runs.append([kind, i, i, num(r[k])])
total = sum(num(r[k]) for r in body)
print(f"stall samples by run (once: executed < {8 * once:.0f} times; runs under 1 % left out):")
for kind, a, b, samples in runs:
    if samples >= 0.01 * total:
        print(f"  {kind:5} instructions {a:5}-{b:5}  {samples:7.0f} samples  {100 * samples / total:5.1f} %")
PY
