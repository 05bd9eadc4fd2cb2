#!/usr/bin/env bash
# Regenerates the routing tables of bench/RESULTS.md:
#  1. router throughput (4096 tokens, d 2048, E 8/64/256; bench/route.cpp);
#  2. the context router on tinymoe's c / py / en: fit time and held-out accuracy of 300-byte
#     prompts (training prompts from corpus-<d>.train.bin, held-out from eval-<d>.txt).
set -euo pipefail
build=${1:-build-release}
data=${2:-../shared/data/tinymoe}
"$build/bin/s2lc_bench_route_quality" "$data"
"$build/bin/s2lc_bench_route" 2>/dev/null | sed -n '/^route: time ratios/,$p'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/route/make_examples.py "$data" "$work"
"$build/bin/s2lc" route fit "$work/train.json" -o "$work/R.json"
"$build/bin/s2lc" route eval "$work/R.json" "$work/heldout.json"
