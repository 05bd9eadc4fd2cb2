#!/usr/bin/env bash
# Regenerates the CLI rows of the compressed-apply tables in bench/RESULTS.md (ratio 8, 1 thread;
# every run times f32 and int8 activations, OpenBLAS, our f32 kernel and both bounds).
# Pass --big to add 4096 x 14336 at batch 1, 8 and 32 (each compresses for about 2.5 minutes).
set -euo pipefail
bin=${BIN:-build-release/bin/s2lc}
for args in "--batch 1 --morph 2" "--batch 1 --morph 4" "--batch 1 --morph 8" "--batch 1 --morph 8 --truncate --morph-bits 4" \
            "--batch 8" "--batch 32" \
            "--batch 1 --hot" "--batch 8 --hot" "--batch 32 --hot"; do
  $bin bench apply --rows 2048 --cols 1408 --ratio 8 --threads 1 --activations int8 $args --json | tr -d '\n '
  echo
done
if [[ "${1:-}" == "--big" ]]; then
  for b in 1 8 32; do
    $bin bench apply --rows 4096 --cols 14336 --ratio 8 --threads 1 --activations int8 --batch $b --json | tr -d '\n '
    echo
  done
fi
