#!/usr/bin/env bash
# `make serve`: run the service. With the response cache on (LLM_CACHE_ENABLED, default true) and
# a local Redis address that nothing answers on, start a redis-server for the run and stop it when
# the service exits; with the cache off, start none.
# Usage: scripts/serve.sh PYTHON [ARGS...]   (runs PYTHON -m llm_service ARGS...)
set -euo pipefail
python=${1:?usage: scripts/serve.sh PYTHON [ARGS...]}
shift

host=${REDIS_HOST:-localhost}
port=${REDIS_PORT:-6379}
cache=$(printf '%s' "${LLM_CACHE_ENABLED:-true}" | tr '[:upper:]' '[:lower:]')
redis_pid=""
service_pid=""

# shellcheck disable=SC2329  # invoked by the traps below
stop_redis() {
  if [ -n "$redis_pid" ]; then
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=""
  fi
}

# shellcheck disable=SC2329  # invoked by the traps below
forward_term() {
  if [ -n "$service_pid" ]; then
    kill -TERM "$service_pid" 2>/dev/null || true
  fi
}

trap stop_redis EXIT
trap forward_term TERM
# Ctrl-C sends INT to the whole process group: the service gets it itself (a second INT would
# make uvicorn skip its graceful shutdown), so the script only keeps waiting.
trap ':' INT

case "$cache" in
  false | 0 | no | off) ;;
  *)
    case "$host" in
      localhost | 127.0.0.1)
        if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
          redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
          redis_pid=$!
          for _ in $(seq 50); do
            redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
          done
          echo "serve: started redis-server on 127.0.0.1:$port (stopped when the service exits)" >&2
        fi
        ;;
    esac
    ;;
esac

# The demo setup (no GPU, no retrieval model set) serves all-MiniLM-L6-v2 in the embedding slot and,
# as a bi-encoder (cosine of the two embeddings), in the rerank slot; LLM_MODEL_EMBEDDING= or
# LLM_MODEL_RERANK= (empty) turns that slot off.
demo_embedding=models/all-MiniLM-L6-v2
if ! command -v nvidia-smi >/dev/null 2>&1 && [ -f "$demo_embedding/modules.json" ]; then
  if [ -z "${LLM_MODEL_EMBEDDING+set}" ]; then
    export LLM_MODEL_EMBEDDING=$demo_embedding
    echo "serve: embedding slot on $demo_embedding (LLM_MODEL_EMBEDDING= turns it off)" >&2
  fi
  if [ -z "${LLM_MODEL_RERANK+set}" ]; then
    export LLM_MODEL_RERANK=$demo_embedding
    echo "serve: rerank slot on $demo_embedding, cosine scores (LLM_MODEL_RERANK= turns it off)" >&2
  fi
fi

# In the background so that a TERM reaches it through the trap; wait again after a signal.
"$python" -m llm_service "$@" &
service_pid=$!
while kill -0 "$service_pid" 2>/dev/null; do
  wait "$service_pid" || true
done
status=0
wait "$service_pid" || status=$?
exit "$status"
