#!/usr/bin/env bash
# imprint's main job on the small example the repo ships: build imprint, write the tiny
# random-weight model (the real SD 1.x diffusers layout, a few MB), teach it the example concept
# (examples/toy: four pictures of a red toy robot) as the new word <red-toy> with Textual Inversion,
# then generate a grid of images with that word. Real models work the same way (--model DIR).
# Usage: examples/quickstart.sh [OUT_DIR]   (default: examples/out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-examples/out}"
cargo build --release -p imprint-cli
imprint=target/release/imprint
model=examples/.models/tiny
[ -f "$model/model_index.json" ] || "$imprint" model init --config tiny --out "$model" --seed 0
mkdir -p "$out"
"$imprint" train textual-inversion --model "$model" --images examples/toy \
  --token "<red-toy>" --init-word toy --num-vectors 2 --out "$out/red-toy.safetensors" \
  --resolution 64 --steps 60 --batch-size 2 --grad-accum 1 --lr 5e-3 --save-every 20 \
  --validation-prompt "a photo of <red-toy>" --validation-every 30 --num-validation-images 4
"$imprint" concept inspect "$out/red-toy.safetensors"
"$imprint" generate --model "$model" --concept "$out/red-toy.safetensors" \
  --prompt "a photo of <red-toy> on the moon" --negative-prompt "blurry" \
  --num-images 4 --steps 20 --scheduler dpm++2m --seed 42 --out "$out/grid.png"
echo "concept: $out/red-toy.safetensors (log, config and checkpoints beside it)"
echo "images:  $out/grid.png, validation grids in $out/red-toy.validation/"
