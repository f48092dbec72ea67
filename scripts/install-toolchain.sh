#!/usr/bin/env bash
# Installs what building lora-kernels needs beyond Rust, from PyPI, into <repo>/.toolchain:
#   .toolchain/cuda      nvcc 13.0.x (+ crt, nvvm, cudart headers, CCCL); build.rs finds it
#   .toolchain/libclang  libclang.so for bindgen (only for checking src/cuda/bindings.rs)
#
# Pinned to 13.0.x on purpose: PTX from a newer nvcc fails to load on a CUDA 13.0
# driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). Every package is pinned and installed
# with --no-deps, so no dependency floats to a newer release.
#
# Usage: bash scripts/install-toolchain.sh [--no-libclang]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cuda="$repo/.toolchain/cuda"
libclang="$repo/.toolchain/libclang"
pip=(python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location
     --upgrade --no-deps)

if [ -f "$cuda/.installed-13.0.88" ] && [ -x "$cuda/nvidia/cu13/bin/nvcc" ]; then
  echo "nvcc: already in $cuda"
else
  rm -rf "$cuda"
  "${pip[@]}" --target "$cuda" \
    "nvidia-cuda-nvcc==13.0.88" \
    "nvidia-cuda-crt==13.0.88" \
    "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-cccl==13.0.85"
  touch "$cuda/.installed-13.0.88"
fi
"$cuda/nvidia/cu13/bin/nvcc" --version | grep release

if [ "${1:-}" != "--no-libclang" ]; then
  if [ -f "$libclang/clang/native/libclang.so" ]; then
    echo "libclang: already in $libclang"
  else
    "${pip[@]}" --target "$libclang" "libclang==18.1.1"
  fi
  echo "libclang: $libclang/clang/native (export LIBCLANG_PATH=$libclang/clang/native)"
fi
