#!/usr/bin/env bash
# The prepared GPU run (bench/gpu_suite.py says what it runs and writes): on one H100/H200, about
# 8 minutes, results in OUT/gpu_suite.json.
#   bash bench/gpu_suite.sh --out OUT          # the run
#   bash bench/gpu_suite.sh --dry-run          # validate every configuration, CPU only
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_suite.py "$@"
