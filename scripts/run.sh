#!/usr/bin/env bash
# The main job: install dependencies, build the s2lc CLI, and run it on the bundled real weights
# (a layer of the trained tinymoe MoE, its calibration activations and a PEFT LoRA adapter,
# tests/data): inspect, compress the layer's experts 8x, report ratios and errors against the
# baselines at equal bytes, and decompress back to a safetensors file any loader can read.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target s2lc_cli -j "$(nproc)"
set -x
build/bin/s2lc inspect tests/data/tinymoe-upcycled-L1.safetensors tests/data/tinymoe-lora-c.safetensors
out=$(mktemp -d)
build/bin/s2lc compress tests/data/tinymoe-upcycled-L1.safetensors -o "$out/L1.s2lc" --ratio 8
build/bin/s2lc eval tests/data/tinymoe-upcycled-L1.safetensors "$out/L1.s2lc" \
  --calib tests/data/tinymoe-upcycled-L1-calib.safetensors --baselines
build/bin/s2lc decompress "$out/L1.s2lc" -o "$out/L1-reconstructed.safetensors"
build/bin/s2lc inspect "$out/L1-reconstructed.safetensors"
rm -rf "$out"
