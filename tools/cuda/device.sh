#!/usr/bin/env bash
# The one script run on the GPU machine (issue 9): the CUDA tests, then imprint against
# diffusers/PyTorch side by side. That machine has no Rust toolchain, no network and no diffusers.
#
# Here (CPU machine):
#   tools/cuda/build.sh --package      # binaries -> target/cuda-carry (about 13 MB)
#   tools/cuda/wheels.sh               # diffusers 0.42.1 + importlib_metadata -> .whl
# Then through the device tool, carry ["target/cuda-carry", ".whl"], timeout 600:
#   bash tools/cuda/device.sh
# Results go to $OUT (or target/cuda-out): tests.log, bench.md, bench-*.jsonl, concepts-*.jsonl,
# nvidia-smi.txt, summary.txt. DEVICE_BUDGET_S (default 450) bounds the whole run, so a rerun fits
# the lease.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/target/cuda-out}"
mkdir -p "$RESULTS"
BUDGET="${DEVICE_BUDGET_S:-450}"
CARRY="$ROOT/target/cuda-carry"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }

if [ ! -f "$CARRY/paths.env" ]; then
  note "no $CARRY/paths.env: run tools/cuda/build.sh --package here and carry target/cuda-carry"
  exit 1
fi
# BUILD_ROOT and BUILD_TARGET_DIR: the test binaries have the build machine's paths compiled in
# (fixtures, the imprint binary, their scratch folder), so that path is made to lead here.
source "$CARRY/paths.env"
if [ "$BUILD_ROOT" != "$ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
  mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" \
    || { note "cannot link $BUILD_ROOT to $ROOT (the test binaries look for their files there)"; exit 1; }
fi
BIN=/tmp/imprint-cuda
rm -rf "$BIN" && mkdir -p "$BIN" "$BUILD_TARGET_DIR/release" "$BUILD_TARGET_DIR/tmp"
xz -dc "$CARRY/bundle.tar.xz" | tar -x -C "$BIN"
IMPRINT="$BUILD_TARGET_DIR/release/imprint"
cp "$BIN/imprint" "$IMPRINT" && [ -x "$IMPRINT" ] || { note "cannot install the binary at $IMPRINT"; exit 1; }

# cuBLAS, cuRAND, NVRTC (and cuDNN) from the Python packages PyTorch brought; the driver's libcuda
# from its own folder.
LIBS="$(python3 - <<'PY'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${LIBS:+$LIBS:}/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
if ldd "$IMPRINT" | grep "not found" | tee -a "$SUMMARY"; then
  note "missing libraries (above): LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  exit 1
fi

# 1. Tests. The ops' device tests and the CUDA training steps need a GPU by construction; the
#    parity suites run on the device IMPRINT_DEVICE names.
run_test() { # NAME [ENV...]
  local name="$1"; shift
  local exe="$BIN/tests/$name"
  if [ ! -x "$exe" ]; then note "test $name: not carried"; return; fi
  # Each test binary gets at most 4 minutes, and never more than the budget leaves (keeping
  # 30 s for the rest).
  local limit=$(( $(left) - 30 ))
  (( limit > 240 )) && limit=240
  if (( limit < 10 )); then note "test $name: skipped (device budget)"; return; fi
  local t0=$SECONDS
  if env "$@" timeout "$limit" "$exe" --test-threads=4 >> "$RESULTS/tests.log" 2>&1; then
    note "test $name: passed ($((SECONDS - t0)) s)"
  else
    note "test $name: FAILED ($((SECONDS - t0)) s; tests.log)"
  fi
}
{
  echo "== $(date -u) =="
} >> "$RESULTS/tests.log"
run_test ops-cuda
run_test cli-cuda_steps
run_test cli-parity IMPRINT_DEVICE=cuda
run_test cli-inpaint IMPRINT_DEVICE=cuda
run_test train-ti_step_parity IMPRINT_DEVICE=cuda
run_test eval-parity IMPRINT_DEVICE=cuda
run_test cli-mixed_precision IMPRINT_DEVICE=cuda

# 2. The benchmark: SD 1.5 architecture, random weights, 512 px, f32, imprint and diffusers in
#    alternation, peak GPU memory of each process from nvidia-smi.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$RESULTS/bench.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
# diffusers imports lazily: ask for what bench.py uses.
if ! python3 -c "from diffusers import UNet2DConditionModel, DDPMScheduler" 2>> "$RESULTS/bench.log"; then
  note "bench: diffusers not importable (carry .whl from tools/cuda/wheels.sh)"
  exit 0
fi
MODEL=/tmp/sd15
"$IMPRINT" model init --config sd15 --out "$MODEL" >> "$RESULTS/bench.log" 2>&1
bench() { # PRECISION BATCH MODES...
  local precision="$1" batch="$2"; shift 2
  if [ "$(left)" -lt 60 ]; then note "bench $precision batch $batch $*: skipped (device budget)"; return; fi
  timeout "$(( $(left) - 20 ))" python3 benches/compare --device cuda --imprint "$IMPRINT" \
    --python python3 --model "$MODEL" --resolution 512 --batch "$batch" --iters 5 \
    --mixed-precision "$precision" --modes "$@" --json "$RESULTS/bench-$precision-b$batch.jsonl" \
    >> "$RESULTS/bench.md" 2>> "$RESULTS/bench.log" \
    || note "bench $precision batch $batch: failed or cut short (bench.log)"
}
# One concept end to end with each method at its default recipe (fixed costs + recipe steps × the
# measured step time); rows are written as each method finishes.
concepts() { # PRECISION METHODS...
  local precision="$1"; shift
  if [ "$(left)" -lt 60 ]; then note "concepts $precision $*: skipped (device budget)"; return; fi
  timeout "$(( $(left) - 20 ))" python3 benches/compare --device cuda --imprint "$IMPRINT" \
    --python python3 --model "$MODEL" --resolution 512 --mixed-precision "$precision" --modes \
    --concepts "$@" --concept-steps 10 --json "$RESULTS/concepts-$precision.jsonl" \
    >> "$RESULTS/bench.md" 2>> "$RESULTS/bench.log" \
    || note "concepts $precision: failed or cut short (bench.log)"
}
# In order of what the issue's goals need most, so a short budget still measures them.
bench no 1 forward ti ti-step lora dreambooth+gc dreambooth+gc+fused
bench bf16 1 forward ti lora dreambooth+gc+fused
concepts bf16 lora ti dreambooth xti perfusion custom-diffusion dreambooth+prior svdiff
bench no 4 forward lora dreambooth+gc
note "done in $SECONDS s"
cat "$RESULTS/bench.md" >> "$SUMMARY" 2>/dev/null
