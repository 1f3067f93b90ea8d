#!/usr/bin/env bash
# The reference side's missing packages for the GPU machine (it has torch, transformers and peft
# but not diffusers), as wheels in .whl/ for the device tool's `carry`; device.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
ls .whl
