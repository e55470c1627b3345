#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: every megamm/csrc/*.cu for sm_80 and sm_90 in one nvcc call
# per file (files in parallel), warnings as errors. Needs nvcc and its own headers only (no GPU, no
# torch, no CUDA libraries), so a syntax or type error in a kernel is caught on any machine with the
# compiler. Skips (exit 0) when nvcc is absent; NVCC=/path/to/nvcc picks another compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc_bin" ]; then
    echo "check_cuda_compile: nvcc not found, CUDA compile check skipped"
    exit 0
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
start=$(date +%s)

compile() {  # $1: the .cu file; its log goes to $logs/<name>.log
    "$nvcc_bin" -std=c++17 -O3 --Werror all-warnings -Xcompiler -Wall \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -Imegamm/csrc -c -o /dev/null "$1" > "$logs/$(basename "$1").log" 2>&1
}
export -f compile
export nvcc_bin logs

status=0
printf '%s\n' megamm/csrc/*.cu | xargs -P "$(nproc)" -I{} bash -c 'compile {} || echo {} >> "$logs/failed"' || status=$?
if [ -s "$logs/failed" ]; then
    while read -r file; do
        echo "check_cuda_compile: $file FAILED:"
        cat "$logs/$(basename "$file").log"
    done < "$logs/failed"
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
count=$(printf '%s\n' megamm/csrc/*.cu | wc -l)
echo "check_cuda_compile: $count files compiled for sm_80 and sm_90 with $("$nvcc_bin" --version | tail -1) in $(( $(date +%s) - start ))s"
