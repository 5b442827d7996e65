#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler pieces candle's `cuda` feature needs into a
# project-local virtualenv (.cuda-venv, from PyPI: no GPU, no system toolkit)
# and prints the folder holding bin/nvcc. Idempotent.
#
#   export PATH="$(scripts/cuda-env.sh)/bin:$PATH" CUDA_COMPUTE_CAP=90
#   cargo build --release -p ipaflux --features cuda
#
# nvcc is pinned to 13.0.x: PTX from 13.1+ is refused by driver 580 (the GPU
# machines'). CUDA_COMPUTE_CAP=90 targets H100/H200; use your card's value.
# Building needs only these; linking a binary also needs the CUDA libraries
# (libcudart, libcublas, libcublasLt, libcurand, libcuda): see ../shared/cuda/NOTES.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cuda-venv"
pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*")
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}" >&2
fi
cu13="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
"$cu13/bin/nvcc" --version >&2
echo "$cu13"
