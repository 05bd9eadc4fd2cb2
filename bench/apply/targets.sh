#!/usr/bin/env bash
# Runs every bench row issue 4's speed targets are judged on, then prints the "targets" table:
# each target, case and impl with its figure from this run, the limit and whether it is met
# (bench/report.hpp, Target). About 5 minutes on one core; one thread for every contender.
#   bench/apply/targets.sh [REPETITIONS] [extra Google Benchmark flags...]
# The figures use the fastest of REPETITIONS (default 3) of each row.
set -euo pipefail
bin=${BIN:-build-release/bin/s2lc_bench_apply}
reps=${1:-3}
shift || true
filter='apply/(s2lc|s2lc_int8|openblas|stream_bound|fma_bound)/(768x256|2048x1408)_b(1|8|32)_(cold|hot)$'
filter+='|layer/(s2lc|s2lc_int8|openblas|stream_bound|fma_bound)/tinymoe_t(1|8|32)_(cold|hot)$'
filter+='|morph/[^/]*/(768x256|2048x1408|tinymoe_w[123])_b1_cold$'
filter+='|merge/(s2lc|memcpy)/(768x256|2048x1408|tinymoe_domain)(_bf16)?_cold$'
OPENBLAS_NUM_THREADS=1 "$bin" --benchmark_filter="$filter" --benchmark_min_time=0.2 \
  --benchmark_repetitions="$reps" --benchmark_color=false "$@"
