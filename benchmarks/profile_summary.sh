#!/usr/bin/env bash
# Nsight Compute's summary of one sparse MLA forward launch per configuration (benchmarks/
# profile_driver.py; each configuration "KERNEL:LAYOUT:HEADS[:LAUNCH]", default: the vregs
# FP8-products kernel and bf16 keys at 128 heads): duration, DRAM bytes, L2 hit rate, pipe utilizations (the
# tensor pipe's among them), issue activity and warp stall reasons. Writes, per configuration,
# $OUT/summary_<n>_details.txt (ncu's details page) and $OUT/summary_<n>_raw.csv, and prints the
# metrics that say which unit bounds the kernel.
#   OUT=... bash benchmarks/profile_summary.sh ["vregs:row:128" "ws:bf16:128" "vregs:row:128:dict(STEP_KEYS=64)" ...]
OUT=$(realpath -m "${OUT:-.}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=("vregs:row:128" "ws:bf16:128")
n=0
for config in "${configs[@]}"; do
  n=$((n + 1))
  IFS=: read -r kernel layout heads launch <<< "$config"
  echo "== $n: $config"
  rep=/tmp/summary_$n
  rm -f $rep.ncu-rep
  KERNEL=$kernel LAYOUT=$layout HEADS=$heads LAUNCH=$launch timeout 240 ncu --clock-control none -k regex:"fewhead|_ws_fwd|fp8_mma" \
    --launch-skip 1 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
    --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct,sm__cycles_elapsed.avg.per_second \
    -f -o $rep python3 benchmarks/profile_driver.py > "$OUT/summary_${n}_run.txt" 2>&1
  if [ ! -s $rep.ncu-rep ]; then
    tail -15 "$OUT/summary_${n}_run.txt"
    continue
  fi
  ncu -i $rep.ncu-rep --page details --print-details all > "$OUT/summary_${n}_details.txt" 2>&1
  ncu -i $rep.ncu-rep --page raw --csv > "$OUT/summary_${n}_raw.csv" 2>&1
  python3 - "$OUT/summary_${n}_raw.csv" <<'PY'
import csv, re, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "gpu__time_duration.sum" in r)
names, units, values = rows[head], rows[head + 1], rows[head + 2]
m = dict(zip(names, values))
u = dict(zip(names, units))
def show(pattern, limit=40):
    for k in [k for k in names if re.search(pattern, k)][:limit]:
        print(f"  {k} = {m[k]} {u.get(k, '')}")
show(r"^(gpu__time_duration.sum|dram__bytes_read.sum|lts__t_sector_hit_rate.pct|sm__cycles_elapsed.avg.per_second|launch__registers_per_thread|launch__grid_size)$")
show(r"^(sm__throughput|dram__throughput|l1tex__throughput|lts__throughput).*pct_of_peak_sustained_elapsed$")
show(r"^sm__(inst_executed_pipe|pipe)_.*(tensor|gmma|fma|alu|xu|lsu|uniform).*pct_of_peak_sustained_active$")
show(r"^sm__inst_issued.avg.pct_of_peak_sustained_active$|^smsp__issue_active.avg.pct_of_peak_sustained_active$")
stalls = sorted(((float(m[k].replace(",", "") or 0), k) for k in names
                 if k.startswith("smsp__average_warps_issue_stalled_") and k.endswith("_per_issue_active.ratio")), reverse=True)
print("  stalls per issue (top 10):", ", ".join(f"{k[34:-23]} {v:.2f}" for v, k in stalls[:10]))
PY
done
