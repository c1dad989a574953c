#!/usr/bin/env bash
# `make serve`: run the service; when the response cache's Redis is local and not running, start a
# redis-server for it and stop that redis-server again when the service exits.
# Usage: scripts/serve.sh PYTHON [ARGS...]   (runs PYTHON -m llm_service ARGS...)
set -euo pipefail
python=${1:?usage: scripts/serve.sh PYTHON [ARGS...]}
shift
port=${REDIS_PORT:-6379}
started_redis=""

case "${REDIS_HOST:-localhost}" in
  localhost|127.0.0.1)
    if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
      redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes >/dev/null
      started_redis=1
    fi
    ;;
esac
trap '[ -z "$started_redis" ] || redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true' EXIT
# Forward termination to the service so it drains (see APP_SHUTDOWN_GRACE_SECONDS), then clean up.
"$python" -m llm_service "$@" &
service=$!
trap 'kill -TERM "$service" 2>/dev/null || true' TERM INT
status=0
wait "$service" || status=$?
if [ "$status" -gt 128 ]; then
  # A trapped signal interrupted the wait: wait for the service to finish draining, for its own status.
  status=0
  wait "$service" || status=$?
fi
exit "$status"
