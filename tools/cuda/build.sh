#!/usr/bin/env bash
# Builds imprint with `--features cuda` on a machine with no GPU and no CUDA toolkit (issue 9).
#
#   tools/cuda/build.sh            the release binary; prints its path
#   tools/cuda/build.sh --tests    the release binary and the test binaries (`cargo test --no-run`);
#                                  their paths go to $CARGO_TARGET_DIR/cuda-tests.txt
#   tools/cuda/build.sh --check    `cargo check` of every crate with CUDA on (what CI runs): compiles
#                                  candle's CUDA kernels with nvcc and our CUDA code paths, links nothing
#   tools/cuda/build.sh --package  --tests, then packs the binaries device.sh runs into
#                                  target/cuda-carry/ (the device receives at most 64 MiB in all)
#
# nvcc and the CUDA headers come from PyPI wheels pinned to CUDA 13.0, in a virtual environment
# ($CUDA_VENV, default target/cuda-venv): the device's driver (580) runs CUDA 13.0 and rejects PTX
# from newer compilers. Kernels target compute capability 9.0 (H100/H200) unless CUDA_COMPUTE_CAP
# says otherwise. Builds go to $CARGO_TARGET_DIR (default target/cuda, apart from the CPU build).
#
# Linking: candle builds cudarc with `dynamic-linking`, so the linker wants libcuda, libnvrtc,
# libcurand, libcublas and libcublasLt. It gets stubs with CUDA 13.0's sonames (tools/cuda/stubs.py);
# libcudart (candle's MoE kernels) is the runtime wheel's own. On the device the loader finds the
# real libraries (device.sh sets LD_LIBRARY_PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODE=build
case "${1:-}" in
  "") ;;
  --tests) MODE=tests ;;
  --check) MODE=check ;;
  --package) MODE=package ;;
  *) echo "usage: $0 [--tests|--check|--package]" >&2; exit 2 ;;
esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
VENV="${CUDA_VENV:-$ROOT/target/cuda-venv}"
# Known to install together; CUDA 13.0 throughout.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.imprint-wheels"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
  echo "${WHEELS[*]}" > "$STAMP"
fi
CUDA_HOME="$("$VENV/bin/python" - <<'PY'
import pathlib, nvidia
for root in nvidia.__path__:
    for nvcc in pathlib.Path(root).glob("*/bin/nvcc"):
        print(nvcc.parent.parent)
        raise SystemExit
raise SystemExit("nvcc not found in the nvidia wheels")
PY
)"
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
nvcc --version | tail -2

# Stub libraries for the linker, made from the cudarc version Cargo.lock pins.
CUDARC_SRC="$(cargo metadata --format-version 1 --features imprint-cli/cuda 2>/dev/null \
  | python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')"
STUBS="$CARGO_TARGET_DIR/cuda-stubs"
python3 tools/cuda/stubs.py "$CUDARC_SRC" "$STUBS" >/dev/null
# candle-kernels' MoE kernels link the CUDA runtime: the wheel's real one, by its unversioned name.
ln -sfn "$CUDA_HOME/lib/libcudart.so.13" "$STUBS/libcudart.so"
export LIBRARY_PATH="$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"

# Every crate with a `cuda` feature; the others reach CUDA through candle (IMPRINT_DEVICE).
FEATURES=(--features imprint-ops/cuda,imprint-models/cuda,imprint-pipeline/cuda,imprint-cli/cuda)
case "$MODE" in
  check)
    cargo check --workspace --all-targets "${FEATURES[@]}"
    echo "CUDA check build passed"
    ;;
  build)
    cargo build --release -p imprint-cli --features cuda
    echo "$CARGO_TARGET_DIR/release/imprint"
    ;;
  tests|package)
    cargo build --release -p imprint-cli --features cuda
    # One line per test binary: CRATE-TARGET PATH (e.g. "cli-parity /…/parity-0123abcd").
    cargo test --release --workspace "${FEATURES[@]}" --no-run --message-format=json \
      | python3 -c 'import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        crate = os.path.basename(os.path.dirname(m["manifest_path"]))
        print(crate + "-" + m["target"]["name"], m["executable"])' > "$CARGO_TARGET_DIR/cuda-tests.txt"
    echo "$CARGO_TARGET_DIR/release/imprint"
    echo "test binaries: $CARGO_TARGET_DIR/cuda-tests.txt ($(wc -l < "$CARGO_TARGET_DIR/cuda-tests.txt"))"
    if [ "$MODE" = package ]; then
      # The binaries device.sh runs. Each carries candle's PTX (tens of MB, the same in all), so
      # they go into one tar compressed with a dictionary larger than the whole: every copy after
      # the first costs almost nothing (390 MB of binaries become about 13 MB).
      DEVICE_TESTS=(ops-cuda cli-cuda_steps cli-parity cli-inpaint cli-mixed_precision train-ti_step_parity eval-parity)
      CARRY="$ROOT/target/cuda-carry"
      STAGE="$CARGO_TARGET_DIR/carry-stage"
      rm -rf "$CARRY" "$STAGE" && mkdir -p "$CARRY" "$STAGE/tests"
      printf 'BUILD_ROOT=%q\nBUILD_TARGET_DIR=%q\n' "$ROOT" "$CARGO_TARGET_DIR" > "$CARRY/paths.env"
      strip -o "$STAGE/imprint" "$CARGO_TARGET_DIR/release/imprint"
      for name in "${DEVICE_TESTS[@]}"; do
        exe="$(awk -v n="$name" '$1 == n {print $2}' "$CARGO_TARGET_DIR/cuda-tests.txt")"
        if [ -z "$exe" ]; then echo "no test binary $name" >&2; exit 1; fi
        strip -o "$STAGE/tests/$name" "$exe"
      done
      tar -C "$STAGE" -cf - imprint tests | xz -T1 -9 --lzma2=preset=9,dict=512MiB > "$CARRY/bundle.tar.xz.tmp"
      mv "$CARRY/bundle.tar.xz.tmp" "$CARRY/bundle.tar.xz"
      rm -rf "$STAGE"
      du -sh "$CARRY"
      echo "carry target/cuda-carry (and .whl from tools/cuda/wheels.sh); run: bash tools/cuda/device.sh"
    fi
    ;;
esac
