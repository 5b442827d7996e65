#!/usr/bin/env bash
# Static facts about our CUDA kernels without a GPU: ptxas' registers and
# spills per entry point, and the instruction mix of each tensor-core loop
# (scripts/sass_loops.py over cuobjdump's SASS). For comparing kernel
# versions in sessions without a GPU; it times nothing. Not part of CI.
#
#   scripts/kernel-sass.sh [ARCH] [ENTRY_REGEX]     # default sm_90, all entries
#
# ARCH sm_90a compiles attention's wgmma version alone (as build.rs does for
# its compute_90a module).
#
# Installs cuobjdump and nvdisasm (13.2: the first on PyPI; they read 13.0's
# cubins) into .cuda-venv beside nvcc (scripts/cuda-env.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
arch="${1:-sm_90}"
filter="${2:-.}"
cu13="$(bash scripts/cuda-env.sh 2>/dev/null)"
if [ ! -x "$cu13/bin/cuobjdump" ] || [ ! -x "$cu13/bin/nvdisasm" ]; then
  .cuda-venv/bin/pip install --quiet --disable-pip-version-check \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86 >&2
fi
export PATH="$cu13/bin:$PATH"
out="${CARGO_TARGET_DIR:-target}/kernel-sass"
mkdir -p "$out"
for kernel in attention modulation; do
  src="native/src/cuda/$kernel/$kernel.cu"
  defines=()
  if [ "$arch" = sm_90a ] && [ "$kernel" = attention ]; then defines=(-DIPAFLUX_WGMMA_ONLY); fi
  nvcc -arch="$arch" -O3 -cubin -Xptxas -v "${defines[@]}" -I"$cu13/include" -o "$out/$kernel.cubin" "$src" 2> "$out/$kernel.ptxas"
  # "Compiling entry function 'NAME'" … "N bytes spill stores" … "Used R registers"
  awk -v f="$filter" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
    /spill stores/ { spill = $5 }
    /Used [0-9]+ registers/ { if (name ~ f) printf "%-32s %3d registers, %s bytes spilled\n", name, $5, spill }
  ' "$out/$kernel.ptxas" | sort
  for name in $(grep -o "Compiling entry function '[^']*'" "$out/$kernel.ptxas" | cut -d"'" -f2 | grep -E "$filter" | sort); do
    cuobjdump -sass -fun "$name" "$out/$kernel.cubin" | python3 scripts/sass_loops.py "$name"
  done
done
