#!/usr/bin/env bash
# Runs our CUDA kernels on the host, without a GPU, against references written
# from their contracts: native/src/cuda/host_emulation.hpp emulates the
# execution model (threads, barriers, warp shuffles, ldmatrix, mma.sync,
# cp.async); each kernel folder's host_emulation.cpp holds the checks. Needs g++
# (C++20) and the CUDA headers of scripts/cuda-env.sh (passed as $1, or found
# by running it). `cargo xtask cuda-check` runs it, so CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
cu13="${1:-$(bash scripts/cuda-env.sh)}"
out="${CARGO_TARGET_DIR:-target}/kernel-emulation"
mkdir -p "$out"
status=0
for kernel in modulation attention ip_term; do
  src="native/src/cuda/$kernel"
  g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -I"$cu13/include" -I"$src" \
    -o "$out/$kernel" "$src/host_emulation.cpp"
  "$out/$kernel" || status=1
done
exit $status
