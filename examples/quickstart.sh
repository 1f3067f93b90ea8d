#!/usr/bin/env bash
# imprint's main job on the small example: build imprint, write the tiny random-weight model
# (the real SD 1.x layout, a few MB) and generate a grid of images from a prompt.
# Usage: examples/quickstart.sh [OUT_DIR]   (default: examples/out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-examples/out}"
cargo build --release -p imprint-cli
imprint=target/release/imprint
model=examples/.models/tiny
[ -f "$model/model_index.json" ] || "$imprint" model init --config tiny --out "$model" --seed 0
mkdir -p "$out"
"$imprint" generate --model "$model" --prompt "a photo of a red toy on a wooden table" \
  --negative-prompt "blurry" --num-images 4 --steps 20 --scheduler dpm++2m --seed 42 --out "$out/grid.png"
echo "wrote $out/grid.png (and $out/grid-0.png … grid-3.png)"
