#!/usr/bin/env bash
# imprint's main job on the example the repo ships: the toy world's base model (examples/world, a
# small Stable Diffusion in the real diffusers layout that imprint trained on rendered, captioned
# scenes) has never seen held-out concept 0, "checker-star" (a teal star with a magenta checkered
# fill). Textual Inversion teaches it the new word <checker-star> from five reference pictures;
# then a grid shows the concept in new scenes, beside the base model's grid for the same prompt
# with the class word, and the world's evaluators score both (DINO and CLIP-I: likeness to the
# references; CLIP-T: agreement with the prompt). Real models work the same way (--model DIR).
# Usage: examples/quickstart.sh [OUT_DIR]   (default: examples/out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-examples/out}"
cargo build --release -p imprint-cli
imprint=target/release/imprint
world=examples/world
mkdir -p "$out"
rm -rf "$out/checker-star" "$out/checker-star.safetensors" "$out/samples" "$out/base-samples"
"$imprint" world concept --id 0 --count 5 --subject "<checker-star>" --out "$out/checker-star"
"$imprint" train textual-inversion --model "$world/model" --images "$out/checker-star" \
  --token "<checker-star>" --init-word star --templates captions \
  --out "$out/checker-star.safetensors" --resolution 64 --steps 300 --batch-size 4 \
  --grad-accum 1 --lr 5e-3 --save-every 100 \
  --validation-prompt "a <checker-star> on a solid yellow background" --validation-every 150 \
  --num-validation-images 4
"$imprint" concept inspect "$out/checker-star.safetensors"
prompt="a <checker-star> at the top left of a striped gray background"
base_prompt="a star at the top left of a striped gray background"
mkdir -p "$out/samples" "$out/base-samples"
"$imprint" generate --model "$world/model" --concept "$out/checker-star.safetensors" \
  --prompt "$prompt" --num-images 8 --steps 25 --guidance 5 --seed 42 --out "$out/samples/s.png"
"$imprint" generate --model "$world/model" \
  --prompt "$base_prompt" --num-images 8 --steps 25 --guidance 5 --seed 42 --out "$out/base-samples/s.png"
mv "$out/samples/s.png" "$out/grid.png"
mv "$out/base-samples/s.png" "$out/base-grid.png"
for s in samples base-samples; do
  echo "$s:"
  "$imprint" eval --generated "$out/$s" --references "$out/checker-star" --prompt "$base_prompt" \
    --clip "$world/clip" --dino "$world/dino" --json
done
echo "concept: $out/checker-star.safetensors (log, config and checkpoints beside it)"
echo "images:  $out/grid.png (with the concept), $out/base-grid.png (the base model's star)"
