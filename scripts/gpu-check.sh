#!/usr/bin/env bash
# One-shot check of the GPU start path, for the first machine with an NVIDIA GPU and the CUDA build:
# plan, preload, one chat per slot, one image on multimodal, a swap, an engine kill and its recovery.
# Writes one JSON report (planned against measured bytes per engine, load times, nvidia-smi before
# and after each step, vLLM's log lines with memory figures); exits non-zero on any failure.
#
# Usage: scripts/gpu-check.sh [--device-memory 24GiB] [--report FILE] [--port N] [--timeout S]
#        scripts/gpu-check.sh --dry-run    # no GPU: fake engines, every step's wiring (make test runs it)
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

dry_run=false
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=true; fi
done
if [ "$dry_run" = false ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: nvidia-smi not found: this needs an NVIDIA GPU and its driver (or use --dry-run)" >&2
  exit 2
fi

cd "$repo"
exec "$python" -m llm_service.tools.gpu_check "$@"
