#!/usr/bin/env bash
# The GPU check: one run on a machine with an NVIDIA GPU (H100/H200 for the
# default build) that has the driver, CUDA 13.0's libraries and PyTorch, but
# needs neither Rust nor a network. Build first, on any Linux machine:
#
#   scripts/cuda-build.sh          # → .gpu/ipaflux.gz and .gpu/core-tests.gz
#
# then, on the GPU machine, in the repository root (fixtures in tests/fixtures):
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# It runs, in order (each step's log in OUT_DIR):
#   1. the registry's CUDA test against the driver (core's test binary, IPAFLUX_REQUIRE_CUDA=1);
#   2. scripts/gpu_bench_torch.py: PyTorch's figures at the real shapes on this card;
#   3. ipaflux generate on the tiny fixtures on the CPU, on CUDA in f32 (pixels within 2/255 of
#      the CPU's), in bf16 (difference reported), and in f32 with --vram-budget so small that the
#      registry streams some Flux blocks (pixels identical to the all-resident CUDA run), and in
#      bf16 with --cuda-kernels candidate (within 24/255 of the CPU: catches a broken kernel);
#   4. ipaflux gpu-check --torch …: parity checks, fused attention, registry vs driver,
#      benchmarks with PyTorch's figures and the ratios, Flux streamed in 12 GiB; prints the table;
#   5. where Nsight Compute (ncu) is installed: GPU time per kernel of a Flux step (1+1 blocks,
#      1024², bf16), summed by kernel name: where the step's time goes (ncu.csv, kernels.txt),
#      then the same with the candidate kernels (ncu-candidate.csv, kernels-candidate.txt).
# Exit status: non-zero if a check failed (benchmarks never fail it).
# STEPS="3 4" runs only those steps (default: all).
# diffusers (pure Python) may be missing there: put its wheel and importlib_metadata's in .whl/.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${OUT:-/tmp/ipaflux-gpu-check}}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
status=0
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
bin="$(mktemp -d)"
for f in ipaflux core-tests; do
  if [ -f ".gpu/$f.gz" ]; then gzip -dc ".gpu/$f.gz" > "$bin/$f" && chmod +x "$bin/$f"; fi
done
if [ ! -x "$bin/ipaflux" ]; then
  echo "gpu-check: .gpu/ipaflux.gz is missing: run scripts/cuda-build.sh first" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader | tee "$out/gpu.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if want 1; then
echo "== 1. registry vs driver (core's test binary, built with CORE_TESTS=1)"
if [ -x "$bin/core-tests" ]; then
  IPAFLUX_REQUIRE_CUDA=1 timeout 60 "$bin/core-tests" registry::cuda --nocapture 2>&1 | tee "$out/core-tests.log" | tail -n 8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "gpu-check: .gpu/core-tests.gz missing; skipped" | tee "$out/core-tests.log"
fi
fi

if want 2; then
echo "== 2. PyTorch on this card"
timeout 200 python3 scripts/gpu_bench_torch.py --json "$out/torch.json" --runs "${RUNS:-10}" > "$out/torch.log" 2>&1
echo "torch: exit $? ($(tail -n 1 "$out/torch.log" | cut -c1-100))"
grep 'gpu_bench_torch:' "$out/torch.log" || true
fi

if want 3; then
echo "== 3. ipaflux generate on the fixtures (tiny models): CUDA against the CPU"
f=tests/fixtures
gen() {
  timeout 60 "$bin/ipaflux" generate --flux $f/flux/transformer --t5 $f/pipeline/t5 --clip $f/pipeline/clip \
    --vae $f/pipeline/ae.safetensors --ip-adapter $f/ip-adapter.bin --siglip $f/siglip-vision \
    --image $f/images/wide.png --prompt "a cat" --width 64 --height 48 --steps 2 --t5-max-len 16 "$@" >> "$out/generate.log" 2>&1
}
# 1 GiB (the registry's safety margin) + 1.2 MB: the tiny Flux (1.29 MB in f32) cannot be all resident.
gen --device cpu --out "$out/gen-cpu.png" && gen --device cuda:0 --out "$out/gen-cuda-f32.png" \
  && gen --device cuda:0 --dtype bf16 --out "$out/gen-cuda-bf16.png" \
  && gen --device cuda:0 --vram-budget 1074941824 --verbose --out "$out/gen-cuda-stream.png"
g=$?
# The candidate kernel set (not yet run on a GPU before): bf16 only (the kernels take bf16/f16).
gen --device cuda:0 --dtype bf16 --cuda-kernels candidate --out "$out/gen-cuda-bf16-candidate.png" || g=1
grep -E "stream" "$out/generate.log" | head -n 6
echo "generate: exit $g"
[ "$g" -eq 0 ] || { status=1; tail -n 5 "$out/generate.log"; }
python3 - "$out" <<'PY' || status=1
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
cpu = np.asarray(Image.open(f"{out}/gen-cpu.png"), dtype=np.int16)
bad = 0
# bf16 is reported; the candidate kernels' bf16 image must stay near it (24/255 catches a broken
# kernel, whose image is noise, not bf16 rounding).
for name, limit in (("cuda-f32", 2), ("cuda-bf16", None), ("cuda-stream", 2), ("cuda-bf16-candidate", 24)):
    img = np.asarray(Image.open(f"{out}/gen-{name}.png"), dtype=np.int16)
    d = np.abs(img - cpu)
    verdict = "" if limit is None else ("PASS" if d.max() <= limit else "FAIL")
    bad += verdict == "FAIL"
    print(f"generate {name} vs cpu f32: max |diff| {d.max()}/255, mean {d.mean():.3f}"
          + (f" (limit {limit}) {verdict}" if limit is not None else " (reported)"))
a = np.asarray(Image.open(f"{out}/gen-cuda-f32.png"), dtype=np.int16)
b = np.asarray(Image.open(f"{out}/gen-cuda-stream.png"), dtype=np.int16)
same = bool((a == b).all())
bad += not same
print(f"generate cuda-stream vs cuda-f32 all resident: {'identical PASS' if same else 'DIFFERENT FAIL'}")
sys.exit(1 if bad else 0)
PY
fi

if want 4; then
echo "== 4. ipaflux gpu-check"
torch_arg=()
[ -s "$out/torch.json" ] && torch_arg=(--torch "$out/torch.json")
timeout 400 "$bin/ipaflux" gpu-check --runs "${RUNS:-10}" "${torch_arg[@]}" --out "$out/table.md" > "$out/gpu-check.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || status=1
grep -v -e '^|' -e '^gpu-check: row: ' "$out/gpu-check.log" | tail -n 20
echo "ipaflux gpu-check: exit $rc"
# Stopped part-way (rc 124: the timeout), no table: the rows it finished, as it wrote them.
cat "$out/table.md" 2>/dev/null || grep '^gpu-check: row: ' "$out/gpu-check.log" | sed 's/^gpu-check: row: //'
fi
if want 5; then
echo "== 5. kernel times of one Flux step (ncu; 1 double + 1 single block, 1024², bf16)"
ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
if [ -n "$ncu" ]; then
  timeout 150 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --print-units base "$bin/ipaflux" bench --flux --flux-device cuda:0 --flux-dtype bf16 --flux-depth 1 1 \
    --flux-plain --runs 1 > "$out/ncu.csv" 2> "$out/ncu.log"
  echo "ncu: exit $?"
  python3 scripts/ncu_summary.py "$out/ncu.csv" | tee "$out/kernels.txt"
  echo "-- the same with --cuda-kernels candidate"
  timeout 150 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --print-units base "$bin/ipaflux" bench --flux --flux-device cuda:0 --flux-dtype bf16 --flux-depth 1 1 \
    --flux-plain --cuda-kernels candidate --runs 1 > "$out/ncu-candidate.csv" 2>> "$out/ncu.log"
  echo "ncu (candidate): exit $?"
  python3 scripts/ncu_summary.py "$out/ncu-candidate.csv" | tee "$out/kernels-candidate.txt"
else
  echo "ncu not found; skipped"
fi
fi
exit $status
