#!/usr/bin/env bash
# Every test: install dependencies, then
#  1. release build (warnings are errors) + all doctest suites, CLI tests, the single-header
#     check and compile, fuzz-corpus replay, and the find_package / add_subdirectory consumers;
#  2. the same suites again under ASan + UBSan (not the package consumers, the single-header
#     program, the clang compile or the fuzz seed checks, whose outcome the sanitizers do not change).
# Tests of each build run in parallel (ctest -j). Needs ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)
start=$SECONDS

echo "== release build + tests"
cmake --preset release > /dev/null
cmake --build --preset release -j "$jobs"
ctest --preset release -j "$jobs"

echo "== ASan + UBSan build + tests"
cmake --preset asan > /dev/null
cmake --build --preset asan -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --preset asan -j "$jobs" -LE package

echo "== all tests passed in $((SECONDS - start)) s"
