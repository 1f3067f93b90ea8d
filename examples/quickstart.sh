#!/usr/bin/env bash
# imprint's main job on the example the repo ships: the toy world (examples/world/, a small
# Stable Diffusion that imprint trained itself on procedurally drawn 64 px scenes; see
# `imprint world train`). Write five pictures of a held-out world concept — a teal star with
# magenta checks, a look the base model never saw — teach it to the model as the new word
# <checker-star> with Textual Inversion, then generate it in scenes it was never shown, beside
# what the base model draws for the plain word "star". Real models work the same way (--model DIR).
# Usage: examples/quickstart.sh [OUT_DIR]   (default: examples/out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-examples/out}"
cargo build --release -p imprint-cli
imprint=target/release/imprint
model=examples/world/model
mkdir -p "$out"
"$imprint" world concept --id 0 --count 5 --subject "<checker-star>" --out "$out/references"
"$imprint" train textual-inversion --model "$model" --images "$out/references" \
  --token "<checker-star>" --init-word star --templates captions --out "$out/checker-star.safetensors" \
  --resolution 64 --steps 300 --batch-size 4 --grad-accum 1 --lr 5e-3 --save-every 100 \
  --validation-prompt "a <checker-star> at the center of a solid white background" \
  --validation-every 100 --num-validation-images 4
"$imprint" concept inspect "$out/checker-star.safetensors"
prompt="a big <checker-star> at the bottom right of a striped green background"
"$imprint" generate --model "$model" --concept "$out/checker-star.safetensors" --prompt "$prompt" \
  --num-images 4 --steps 25 --seed 42 --width 64 --height 64 --out "$out/grid.png"
"$imprint" generate --model "$model" --prompt "${prompt/<checker-star>/star}" \
  --num-images 4 --steps 25 --seed 42 --width 64 --height 64 --out "$out/grid-base-model.png"
echo "references: $out/references/ (the concept's five pictures and captions)"
echo "concept:    $out/checker-star.safetensors (log, config and checkpoints beside it)"
echo "images:     $out/grid.png (the concept in a new scene), $out/grid-base-model.png (the plain word)"
