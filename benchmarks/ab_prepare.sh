#!/usr/bin/env bash
# Puts the package as it was at commit REV beside the current one, renamed old_mla_compiler, under
# benchmarks/_ab/ (ignored by git: carry it to the GPU machine), for ab_previous.py to time both
# in one process.
#   bash benchmarks/ab_prepare.sh REV
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: ab_prepare.sh REV}
rm -rf benchmarks/_ab
mkdir -p benchmarks/_ab
git archive "$rev" mla_compiler | tar -x -C benchmarks/_ab
mv benchmarks/_ab/mla_compiler benchmarks/_ab/old_mla_compiler
find benchmarks/_ab/old_mla_compiler -name '*.py' -exec sed -i \
  's/\bfrom mla_compiler\b/from old_mla_compiler/g; s/\bimport mla_compiler\b/import old_mla_compiler/g; s/\bmla_compiler\./old_mla_compiler./g' {} +
echo "$rev" > benchmarks/_ab/REV
echo "benchmarks/_ab/old_mla_compiler: mla_compiler at $(git rev-parse --short "$rev")"
