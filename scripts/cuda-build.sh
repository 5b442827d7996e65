#!/usr/bin/env bash
# Builds the release `ipaflux` binary and core's unit tests with the `cuda`
# feature on a machine without a GPU, for the GPU check (scripts/gpu-check.sh),
# stripped and gzipped into .gpu/, and fetches diffusers' wheels into .whl/ for
# that machine. Idempotent; a second run only rebuilds what changed.
#
#   scripts/cuda-build.sh            # then: scripts/gpu-check.sh on the GPU machine
#
# What it sets up (see ../shared/cuda/NOTES.md for why each piece):
# - nvcc 13.0 and the CUDA libraries from PyPI in .cuda-venv (scripts/cuda-env.sh);
# - .cuda-venv/home/lib64: unversioned links to those libraries plus a *link-time
#   stub* libcuda.so (SONAME libcuda.so.1; every driver entry point cudarc names
#   returns an error). At run time the GPU machine's real libcuda.so.1 is used.
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); set it for another card.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cu13="$(scripts/cuda-env.sh)"
venv="$root/.cuda-venv"
libs=("nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*")
if ! ls "$cu13"/lib/libcublas.so.* "$cu13"/lib/libnvrtc.so.* "$cu13"/lib/libcurand.so.* >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${libs[@]}" >&2
fi
home="$venv/home"
mkdir -p "$home/lib64"
for name in cublas cublasLt cudart curand nvrtc; do
  real="$(ls "$cu13"/lib/lib$name.so.* | head -n1)"
  ln -sf "$real" "$home/lib64/lib$name.so"
done
cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n1)"
stub="$home/stub.c"
grep -rhoE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/" | awk '{print $NF}' | sort -u \
  | sed 's/.*/int &(void){return 999;}/' > "$stub"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/libcuda.so" "$stub"
export PATH="$cu13/bin:$PATH" CUDA_HOME="$home" CUDA_PATH="$home" \
  CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  LIBRARY_PATH="$home/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}" \
  LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo build --release -p ipaflux --features cuda --bin ipaflux
mkdir -p .gpu
# Stripped and gzipped (candle's PTX compresses ~3.5x): a device call carries at most 64 MiB.
strip -o .gpu/ipaflux target/release/ipaflux && gzip -f -9 .gpu/ipaflux
# With CORE_TESTS=1 also core's unit tests with CUDA (the registry's driver test) as a
# second binary, and both crates' unit tests with CUDA run here (below). They are built
# with `-p ipaflux` beside them, so features resolve as for the binary: core alone
# resolves syn without "full" (clap_derive turns it on), which changes the hash of
# candle-kernels' build script (its build-dependency serde_derive uses syn) and compiles
# candle's kernels a second time (~15 min on 2 cores). The cost instead: ipaflux's own
# unit tests are built too (~2 min).
if [ "${CORE_TESTS:-0}" = 1 ]; then
tests="$(cargo test --release -p ipaflux-core -p ipaflux --features ipaflux/cuda --lib --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "ipaflux_core":
        print(m["executable"])' | tail -n 1)"
strip -o .gpu/core-tests "$tests" && gzip -f -9 .gpu/core-tests
# Both crates' unit tests with `cuda`, run here against the link-time stub (every driver
# call fails, as on a machine without a GPU): the host-side tests run, the GPU ones skip.
# A failure stops the build: a test that breaks with `cuda` breaks on the GPU machine too.
mkdir -p "$home/stub"
ln -sf "$home/lib64/libcuda.so" "$home/stub/libcuda.so.1"
LD_LIBRARY_PATH="$home/lib64:$home/stub:$LD_LIBRARY_PATH" \
  cargo test --release -p ipaflux-core -p ipaflux --features ipaflux/cuda --lib -q >&2
fi
# diffusers (pure Python) may be missing on the GPU machine, which has no
# network: its wheel and importlib_metadata's travel in .whl/ (gpu-check.sh
# installs them there). Without them PyTorch's Flux figures (diffusers' transformer) are missing.
diffusers=0.42.1
if ! ls .whl/diffusers-$diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d .whl \
    "diffusers==$diffusers" importlib_metadata zipp >&2 \
    || echo "cuda-build: diffusers' wheels not fetched into .whl/ (PyTorch's Flux figures will be missing on the GPU machine)" >&2
fi
ls -l .gpu/
ls -l .whl/ 2>/dev/null || true
