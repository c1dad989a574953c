#!/usr/bin/env bash
# The deployment guide runs `HF_HOME=/mnt/models bash model-download.sh` from the repository root:
# this wrapper hands over to scripts/model-download.sh (see its --help).
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/model-download.sh" "$@"
