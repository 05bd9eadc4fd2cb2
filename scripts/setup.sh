#!/usr/bin/env bash
# Installs every Debian package s2lc needs to build, test, fuzz and benchmark.
# Idempotent: when everything is present it installs nothing and does not touch apt.
# Must run as root (or with sudo available) on Debian 12.
#   scripts/setup.sh          build, test, fuzz and C++ benchmark dependencies
#   scripts/setup.sh --bench  also the Python stack the rate-distortion bench drives
#                             (../shared eval.py needs PyTorch; plots need matplotlib)
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git python3   # toolchain + amalgamation script
  libxtensor-dev libxsimd-dev                                # tensor containers / expressions
  libhwy-dev                                                 # Google Highway (SIMD kernels)
  libxtensor-blas-dev libopenblas-dev liblapack-dev           # offline linear algebra (SVD, QR)
  nlohmann-json3-dev                                         # headers / manifests
  doctest-dev                                                # tests
  libbenchmark-dev                                           # bench/
  clang libclang-rt-14-dev                                   # libFuzzer harnesses (tests/fuzz)
)
if [ "${1:-}" = "--bench" ]; then
  PACKAGES+=(python3-torch python3-numpy python3-matplotlib)  # bench/rd: eval.py bits-per-byte, plots
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/setup.sh [--bench]" >&2; exit 2
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "s2lc setup: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "s2lc setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
