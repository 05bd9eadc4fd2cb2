#!/usr/bin/env bash
# Regenerates the compressed-apply table of bench/RESULTS.md (2048 x 1408, ratio 8, 1 thread).
set -euo pipefail
bin=${1:-build-release/bin/s2lc}
for args in "--batch 1 --morph 2" "--batch 1 --morph 4" "--batch 1 --morph 8" "--batch 8" "--batch 32" \
            "--batch 1 --hot" "--batch 8 --hot" "--batch 32 --hot"; do
  $bin bench apply --rows 2048 --cols 1408 --ratio 8 --threads 1 $args --json | tr -d '\n '
  echo
done
