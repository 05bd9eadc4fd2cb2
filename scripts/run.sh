#!/usr/bin/env bash
# The main job: install dependencies, build the s2lc CLI, and run it on the bundled real weights
# (a layer of the trained tinymoe MoE and a PEFT LoRA adapter, tests/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build --target s2lc_cli -j "$(nproc)"
set -x
build/bin/s2lc inspect tests/data/tinymoe-upcycled-L1.safetensors tests/data/tinymoe-lora-c.safetensors
