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
PY
