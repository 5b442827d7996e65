#!/usr/bin/env bash
# The GPU check: one run on a machine with an NVIDIA GPU (H100/H200 for the
# default build) that has the driver, CUDA 13.0's libraries and PyTorch, but
# needs neither Rust nor a network. Build first, on any Linux machine:
#
#   CORE_TESTS=1 scripts/cuda-build.sh   # → .gpu/ipaflux.gz, .gpu/core-tests.gz, .whl/ (diffusers)
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
#      bf16 with --cuda-kernels baseline (both bf16 runs within 24/255 of the CPU: catches a
#      broken kernel);
#   4. ipaflux gpu-check --torch …: parity checks, fused attention, registry vs driver,
#      benchmarks with PyTorch's figures and the ratios, Flux streamed in 12 GiB; prints the table
#      (attention version 8 first in a run of its own: in the main run only if that passed);
#   5. where Nsight Compute (ncu) is installed: GPU time per kernel of a Flux step (1+1 blocks,
#      1024², bf16), summed by kernel name: where the step's time goes (ncu.csv, kernels.txt),
#      then the same with the baseline kernels (ncu-baseline.csv, kernels-baseline.txt), then the
#      default attention kernel's full ncu report of one launch (attention6.txt), of one
#      IP-Adapter term launch (attention6-ip.txt) and of one attention version 8 launch
#      (attention8.txt);
#   6. (run before 5) where compute-sanitizer is installed: memcheck (during `gpu-check --quick`)
#      and racecheck (its attention section) over our own kernels (names holding "ipaflux");
#      a finding the sanitizer
#      reports fails the check (its own internal errors and the program's exit are reported).
# Exit status: non-zero if a check failed (benchmarks never fail it).
# STEPS="3 4" runs only those steps (default: all).
# diffusers (pure Python) may be missing there: cuda-build.sh puts its wheels in .whl/ (carry .gpu and .whl).
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
# The baseline kernel set: bf16 only (the kernels take bf16/f16).
gen --device cuda:0 --dtype bf16 --cuda-kernels baseline --out "$out/gen-cuda-bf16-baseline.png" || g=1
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
# bf16 must stay near f32: 24/255 catches a broken kernel, whose image is noise, not bf16 rounding.
for name, limit in (("cuda-f32", 2), ("cuda-bf16", 24), ("cuda-stream", 2), ("cuda-bf16-baseline", 24)):
    img = np.asarray(Image.open(f"{out}/gen-{name}.png"), dtype=np.int16)
    d = np.abs(img - cpu)
    verdict = "PASS" if d.max() <= limit else "FAIL"
    bad += verdict == "FAIL"
    print(f"generate {name} vs cpu f32: max |diff| {d.max()}/255, mean {d.mean():.3f} (limit {limit}) {verdict}")
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
# Attention version 8 (wgmma) has not run on a GPU before session 13's code: alone first, so a
# fault in it (one that spoils the CUDA context) cannot cost the main run's rows; the main run
# leaves it out unless every check of that first run passed.
echo "-- attention version 8 alone (gpu-check --section attention --wgmma only: table-wgmma.md)"
timeout 120 "$bin/ipaflux" gpu-check --section attention --wgmma only --runs "${RUNS:-10}" \
  --out "$out/table-wgmma.md" > "$out/gpu-check-wgmma.log" 2>&1
wg=$?
[ "$wg" -eq 0 ] || status=1
cat "$out/table-wgmma.md" 2>/dev/null || grep '^gpu-check: row: ' "$out/gpu-check-wgmma.log" | sed 's/^gpu-check: row: //'
if [ "$wg" -eq 0 ]; then wgmma=include; else wgmma=exclude; fi
echo "version 8 alone: exit $wg; the main run: --wgmma $wgmma"
timeout 400 "$bin/ipaflux" gpu-check --runs "${RUNS:-10}" --wgmma "$wgmma" "${torch_arg[@]}" --out "$out/table.md" \
  > "$out/gpu-check.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || status=1
grep -v -e '^|' -e '^gpu-check: row: ' "$out/gpu-check.log" | tail -n 20
echo "ipaflux gpu-check: exit $rc"
# Stopped part-way (rc 124: the timeout), no table: the rows it finished, as it wrote them.
cat "$out/table.md" 2>/dev/null || grep '^gpu-check: row: ' "$out/gpu-check.log" | sed 's/^gpu-check: row: //'
fi
if want 6; then
echo "== 6. compute-sanitizer on our kernels (memcheck: gpu-check --quick; racecheck: its attention section)"
san="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$san" ]; then
  # memcheck over gpu-check --quick (every attention version, both kernel sets); racecheck over
  # its attention section only: session 11 saw racecheck stop, with the tool's own "failed to
  # handle a hardware exception", at the first bf16 matrix product of a whole gpu-check --quick
  # and of a Flux step, before any kernel of ours ran (cuBLAS' Hopper kernels, we think).
  for tool in memcheck racecheck; do
    args=(gpu-check --quick --runs 1)
    [ "$tool" = racecheck ] && args+=(--section attention)
    # Only kernels whose name holds "ipaflux" are instrumented (ours); candle's and cuBLAS' run as usual.
    timeout 120 "$san" --tool "$tool" --kernel-name kns=ipaflux --error-exitcode 9 --print-limit 20 \
      "$bin/ipaflux" "${args[@]}" > "$out/sanitizer-$tool.log" 2>&1
    rc=$?
    log="$out/sanitizer-$tool.log"
    summary="$(grep -E '^========= (ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1)"
    echo "compute-sanitizer $tool: exit $rc; ${summary:-no summary}; program: $(grep -E '^[0-9]+ checks' "$log" | tail -n 1)"
    # Findings: an error summary other than 0, or hazards that are not the tool's own internal error.
    internal=$(grep -c 'Internal Sanitizer Error' "$log")
    found=$(echo "$summary" | grep -oE '[0-9]+ (errors?|hazards?)' | head -n 1 | grep -oE '^[0-9]+')
    if [ "${found:-0}" -gt "$internal" ]; then status=1; fi
    grep -E '^=========' "$log" | grep -v -e 'COMPUTE-SANITIZER' -e '^========= *$' | head -n 12
  done
else
  echo "compute-sanitizer not found; skipped"
fi
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
  echo "-- the same with --cuda-kernels baseline"
  timeout 150 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --print-units base "$bin/ipaflux" bench --flux --flux-device cuda:0 --flux-dtype bf16 --flux-depth 1 1 \
    --flux-plain --cuda-kernels baseline --runs 1 > "$out/ncu-baseline.csv" 2>> "$out/ncu.log"
  echo "ncu (baseline): exit $?"
  python3 scripts/ncu_summary.py "$out/ncu-baseline.csv" | tee "$out/kernels-baseline.txt"
  echo "-- the default attention kernel in detail (ncu --set full, one launch at 1024²: attention6.txt)"
  timeout 120 "$ncu" --clock-control none --set full -k regex:ipaflux_attention6_bf16 --launch-count 1 \
    "$bin/ipaflux" bench --flux --flux-device cuda:0 --flux-dtype bf16 --flux-depth 1 1 --flux-plain --runs 1 \
    > "$out/attention6.txt" 2>> "$out/ncu.log"
  echo "ncu (attention6 details): exit $?"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Bank Conflicts|No Eligible|One or More Eligible" \
    "$out/attention6.txt" | head -n 16
  # The IP-Adapter's launch (128 keys, base + s·attention): 0.24 ms in session 11 for 6.4 GFLOP,
  # most of it outside the key loop. In `bench --flux --flux-depth 1 1 --runs 1` the attention
  # launches run: plain step (warm-up, timed), then the hooked warm-up step's double block: its
  # attention (5th launch), its IP term (6th: grid (32, 24, 1) at 1024²).
  echo "-- the IP term's launch in detail (ncu --set full, 6th attention launch: attention6-ip.txt)"
  timeout 120 "$ncu" --clock-control none --set full -k regex:ipaflux_attention6_bf16 --launch-skip 5 \
    --launch-count 1 "$bin/ipaflux" bench --flux --flux-device cuda:0 --flux-dtype bf16 --flux-depth 1 1 --runs 1 \
    > "$out/attention6-ip.txt" 2>> "$out/ncu.log"
  echo "ncu (attention6 IP launch details): exit $?"
  grep -E "Grid Size|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|No Eligible|One or More Eligible" \
    "$out/attention6-ip.txt" | head -n 16
  # Version 8 (wgmma; in no kernel set yet): its first launch in the attention section is an
  # alternative's [1, 24, 4608|4608, 128] call, the Flux 1024² joint shape.
  echo "-- attention version 8 in detail (ncu --set full, its first launch at 1024²: attention8.txt)"
  timeout 120 "$ncu" --clock-control none --set full -k regex:ipaflux_attention8_bf16 --launch-count 1 \
    "$bin/ipaflux" gpu-check --section attention --runs 1 > "$out/attention8.txt" 2>> "$out/ncu.log"
  echo "ncu (attention8 details): exit $?"
  grep -E "Grid Size|Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|One or More Eligible" \
    "$out/attention8.txt" | head -n 16
else
  echo "ncu not found; skipped"
fi
fi
exit $status
