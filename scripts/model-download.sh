#!/usr/bin/env bash
# Download the models of llm-service's slots into the Hugging Face cache, ready to mount into the
# service's container.
#
# Usage: model-download.sh [--slots standard,longctx,multimodal] [--revision REV] [--dry-run] [--help]
#
#   --slots LIST     comma-separated slots to fetch (default: every configured slot: the three
#                    generation slots, embedding and rerank when their model is set, and the slots
#                    of LLM_CONFIG_FILE and LLM_SLOTS__<SLOT>__MODEL)
#   --revision REV   branch, tag or commit to fetch for every slot (default: main)
#   --dry-run        print slot, model id and target directory of each download; fetch nothing
#   -h, --help       this text
#
# Environment:
#   LLM_MODEL_STANDARD, LLM_MODEL_LONGCTX, LLM_MODEL_MULTIMODAL
#                    model id of each slot (default: published AWQ builds of the deployment guide's
#                    models; the guide's own ids are aliases of them); a local path is skipped
#   LLM_MODEL_EMBEDDING, LLM_MODEL_RERANK
#                    model id of the optional retrieval slots; unset: the slot is off, nothing fetched
#   LLM_CONFIG_FILE, LLM_SLOTS__<SLOT>__<FIELD>
#                    the service's slot set (README "Slots"), read by the service's own code
#                    (PYTHON, default python3, must import llm_service: run from the repository)
#   HF_HOME          Hugging Face home; files go to $HF_HOME/hub (default: ~/.cache/huggingface)
#   HF_HUB_CACHE     the hub cache directory itself, if not $HF_HOME/hub
#   HF_TOKEN         access token, needed for gated models (Llama, Gemma): accept the licence on
#                    the model's page first
#   HF_ENDPOINT      Hub address (default: https://huggingface.co), e.g. a mirror
#   MODEL_DOWNLOAD_TIMEOUT
#                    seconds to wait for the Hub in the reachability check (default: 10)
#
# Downloads show progress and resume where an interrupted run stopped: run the script again.
# With HF_HOME set, each model is also linked at $HF_HOME/models--ORG--NAME, so that $HF_HOME
# itself can be mounted as the container's hub cache, as the deployment guide does.
# Exit status: 0 done, 1 download failed, 2 bad arguments, 3 Hub unreachable (offline?),
# 4 unauthorised (HF_TOKEN missing or without access), 5 model not found, 6 no Hugging Face CLI.
set -euo pipefail

readonly ALL_SLOTS="standard,longctx,multimodal"
# Slots that exist only when their model is set (llm_service.config.settings.RETRIEVAL_SLOTS).
readonly RETRIEVAL_SLOTS="embedding,rerank"
# The service's default models; keep in step with llm_service.config.settings.PRODUCTION_MODELS.
readonly DEFAULT_MODEL_STANDARD="hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"
readonly DEFAULT_MODEL_LONGCTX="casperhansen/mistral-nemo-instruct-2407-awq"
readonly DEFAULT_MODEL_MULTIMODAL="gaunernst/gemma-3-12b-it-int4-awq"
# The deployment guide's ids, which are not published: aliases of the defaults, as in
# llm_service.config.settings.GUIDE_MODEL_ALIASES.
readonly GUIDE_MODEL_STANDARD="meta-llama/Llama-3.1-8B-Instruct-AWQ"
readonly GUIDE_MODEL_LONGCTX="mistralai/Mistral-NeMo-Instruct-2407-AWQ"
readonly GUIDE_MODEL_MULTIMODAL="google/gemma-3-12b-it-awq"

PROG="$(basename "$0")"
readonly PROG

say() { printf '%s\n' "$*"; }
err() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    local status="$1"
    shift
    err "$*"
    exit "$status"
}

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

slots=""
revision="main"
dry_run=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --slots) [ "$#" -ge 2 ] || die 2 "--slots needs a value"; slots="$2"; shift 2 ;;
        --slots=*) slots="${1#--slots=}"; shift ;;
        --revision) [ "$#" -ge 2 ] || die 2 "--revision needs a value"; revision="$2"; shift 2 ;;
        --revision=*) revision="${1#--revision=}"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die 2 "unknown argument: $1" ;;
    esac
done

# The published build a guide id stands for; any other id as it is.
resolve_alias() {
    case "$1" in
        "$GUIDE_MODEL_STANDARD") printf '%s' "$DEFAULT_MODEL_STANDARD" ;;
        "$GUIDE_MODEL_LONGCTX") printf '%s' "$DEFAULT_MODEL_LONGCTX" ;;
        "$GUIDE_MODEL_MULTIMODAL") printf '%s' "$DEFAULT_MODEL_MULTIMODAL" ;;
        *) printf '%s' "$1" ;;
    esac
}

# With a slot file (LLM_CONFIG_FILE) or LLM_SLOTS__* variables, the service's own reader lists the
# configured slots and their models (`slot<TAB>model` lines); without, the built-in slots below.
listed=""
if [ -n "${LLM_CONFIG_FILE:-}" ] || env | grep -q '^LLM_SLOTS__'; then
    listed="$("${PYTHON:-python3}" -m llm_service.config.slots)" \
        || die 2 "cannot read the slot set of LLM_CONFIG_FILE / LLM_SLOTS__*: run from the repository with llm_service importable by ${PYTHON:-python3}"
fi
listed_model() { printf '%s\n' "$listed" | awk -F '\t' -v s="$1" '$1 == s { print $2; found = 1 } END { exit !found }'; }

# The slot's LLM_MODEL_* value as set (empty when unset).
configured_model() {
    if [ -n "$listed" ]; then
        listed_model "$1"
        return
    fi
    case "$1" in
        standard) printf '%s' "${LLM_MODEL_STANDARD:-}" ;;
        longctx) printf '%s' "${LLM_MODEL_LONGCTX:-}" ;;
        multimodal) printf '%s' "${LLM_MODEL_MULTIMODAL:-}" ;;
        embedding) printf '%s' "${LLM_MODEL_EMBEDDING:-}" ;;
        rerank) printf '%s' "${LLM_MODEL_RERANK:-}" ;;
        *) return 1 ;;
    esac
}

model_for() {
    local configured
    configured="$(configured_model "$1")" || return 1
    case "$1" in
        standard) resolve_alias "${configured:-$DEFAULT_MODEL_STANDARD}" ;;
        longctx) resolve_alias "${configured:-$DEFAULT_MODEL_LONGCTX}" ;;
        multimodal) resolve_alias "${configured:-$DEFAULT_MODEL_MULTIMODAL}" ;;
        *) printf '%s' "$configured" ;; # a retrieval slot: its model, or empty when off
    esac
}

# " (alias NAME)" when the slot's variable names one of the guide's ids.
alias_note() {
    local configured
    configured="$(configured_model "$1")"
    if [ -n "$configured" ] && [ "$(resolve_alias "$configured")" != "$configured" ]; then
        printf ' (alias %s)' "$configured"
    fi
}

# LLM_MODEL_<SLOT>, the variable that names a slot's model (no ${var^^}: macOS ships bash 3.2).
model_var() { printf 'LLM_MODEL_%s' "$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"; }

# A model value that names a directory on disk (as LLM_MODEL_* may) is served from there as it is.
is_local_path() {
    case "$1" in
        /* | ./* | ../* | "~"*) return 0 ;;
    esac
    [ -d "$1" ]
}

hf_home="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}"
hf_home="${hf_home%/}"
hub_cache="${HF_HUB_CACHE:-$hf_home/hub}"
hub_cache="${hub_cache%/}"
endpoint="${HF_ENDPOINT:-https://huggingface.co}"
endpoint="${endpoint%/}"
timeout="${MODEL_DOWNLOAD_TIMEOUT:-10}"
case "$timeout" in '' | *[!0-9]*) die 2 "MODEL_DOWNLOAD_TIMEOUT must be a whole number of seconds" ;; esac

# Default: every configured slot; without a slot set, every generation slot and each retrieval slot
# whose model is set.
if [ -z "$slots" ] && [ -n "$listed" ]; then
    slots="$(printf '%s\n' "$listed" | cut -f1 | paste -sd, -)"
elif [ -z "$slots" ]; then
    slots="$ALL_SLOTS"
    IFS=',' read -r -a retrieval <<<"$RETRIEVAL_SLOTS"
    for slot in "${retrieval[@]}"; do
        if [ -n "$(configured_model "$slot")" ]; then slots="$slots,$slot"; fi
    done
fi

# The slots to fetch, validated and de-duplicated, in the order given.
selected=()
IFS=',' read -r -a requested <<<"$slots"
for slot in "${requested[@]}"; do
    slot="${slot//[[:space:]]/}"
    [ -n "$slot" ] || continue
    model_for "$slot" >/dev/null || die 2 "unknown slot '$slot' (slots: $ALL_SLOTS,$RETRIEVAL_SLOTS)"
    [ -n "$(model_for "$slot")" ] || die 2 "slot '$slot' is off: set $(model_var "$slot") to its model"
    case " ${selected[*]-} " in *" $slot "*) continue ;; esac
    selected+=("$slot")
done
[ "${#selected[@]}" -gt 0 ] || die 2 "no slot selected (slots: $ALL_SLOTS,$RETRIEVAL_SLOTS)"

target_dir() { printf '%s/models--%s' "$hub_cache" "${1//\//--}"; }

if [ "$dry_run" -eq 1 ]; then
    say "Dry run: nothing is downloaded. Hub: $endpoint, revision: $revision, cache: $hub_cache"
    printf '%-11s %-50s %s\n' "SLOT" "MODEL" "TARGET"
    for slot in "${selected[@]}"; do
        model="$(model_for "$slot")"
        if is_local_path "$model"; then
            printf '%-11s %-50s %s\n' "$slot" "$model" "(local path, not downloaded)"
        else
            printf '%-11s %-50s %s\n' "$slot" "$model" "$(target_dir "$model")$(alias_note "$slot")"
        fi
    done
    exit 0
fi

# The Hugging Face CLI: `hf` (huggingface-hub >= 0.34), else the older `huggingface-cli`.
if command -v hf >/dev/null 2>&1; then
    cli=hf
elif command -v huggingface-cli >/dev/null 2>&1; then
    cli=huggingface-cli
else
    die 6 "no Hugging Face CLI found: pip install huggingface-hub (it provides \`hf\`)"
fi

# HTTP status of a HEAD request ("000" when the Hub cannot be reached), then the Hub's
# X-Error-Code header if any, on one line. Uses curl, else python3.
probe() {
    local url="$1" headers code
    if command -v curl >/dev/null 2>&1; then
        headers="$(mktemp)"
        # The token goes in on stdin (-H @-), not on the command line where `ps` shows it.
        code="$(if [ -n "${HF_TOKEN:-}" ]; then printf 'Authorization: Bearer %s\n' "$HF_TOKEN"; fi \
            | curl -s -I -o /dev/null -D "$headers" -w '%{http_code}' -H @- \
                --connect-timeout "$timeout" --max-time "$((timeout * 3))" "$url" 2>/dev/null)" || true
        printf '%s %s\n' "${code:-000}" \
            "$(tr -d '\r' <"$headers" | sed -n 's/^[Xx]-[Ee]rror-[Cc]ode: *//p' | tail -n 1)"
        rm -f "$headers"
    else
        python3 - "$url" "$timeout" <<'PY'
import os, sys, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
request = urllib.request.Request(url, method="HEAD")
if os.environ.get("HF_TOKEN"):
    request.add_header("Authorization", "Bearer " + os.environ["HF_TOKEN"])
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
try:
    response = urllib.request.build_opener(NoRedirect).open(request, timeout=timeout)
    print(response.status, "")
except urllib.error.HTTPError as exc:
    print(exc.code, exc.headers.get("X-Error-Code", ""))
except Exception:
    print("000", "")
PY
    fi
}

# Sets `code` and `error_code` of the caller from probe().
probe_hub() {
    local answer
    answer="$(probe "$1")" || true
    code="${answer%% *}"
    error_code="${answer#"$code"}"
    error_code="${error_code# }"
    [ -n "$code" ] || die 1 "could not check $endpoint: neither curl nor a working python3 found."
}

# Fail fast and clearly, before the CLI's own retries, when the Hub is out of reach or refuses us.
preflight() {
    local slot="$1" model="$2" code error_code
    probe_hub "$endpoint/$model/resolve/$revision/config.json"
    case "$code" in
        2?? | 3??) return 0 ;;
        000)
            die 3 "cannot reach the Hugging Face Hub at $endpoint (no network, DNS, proxy or firewall?)." \
                "Check the connection or set HF_ENDPOINT to a reachable mirror; nothing was downloaded." ;;
        401)
            if [ "$error_code" = "RepoNotFound" ] && [ -n "${HF_TOKEN:-}" ]; then
                die 5 "slot $slot: model '$model' not found on $endpoint (check $(model_var "$slot"))."
            fi
            die 4 "slot $slot: unauthorised for '$model' (HTTP 401). It is gated or private, or does not" \
                "exist: set HF_TOKEN to a token of an account that accepted the model's licence" \
                "(https://huggingface.co/settings/tokens), and check the model id." ;;
        403)
            die 4 "slot $slot: access to '$model' denied (HTTP 403): HF_TOKEN is set, but its account" \
                "has not been granted this gated model (accept the licence on the model's page) or the" \
                "token lacks read access." ;;
        404)
            # A repository without config.json (GGUF-only, for one) is still downloadable.
            probe_hub "$endpoint/api/models/$model/revision/$revision"
            case "$code" in 2??) return 0 ;; esac
            die 5 "slot $slot: model '$model' (revision $revision) not found on $endpoint" \
                "(check $(model_var "$slot") and --revision)." ;;
        429 | 5??)
            die 3 "the Hub at $endpoint answered HTTP $code for '$model': it is busy or down; try again later." ;;
        *)
            die 1 "unexpected HTTP $code from $endpoint for '$model'." ;;
    esac
}

mkdir -p "$hub_cache"
say "Models for slots ${selected[*]} into $hub_cache (Hub: $endpoint, revision: $revision)"
for slot in "${selected[@]}"; do
    model="$(model_for "$slot")"
    if is_local_path "$model"; then
        say "[$slot] $model is a local path: nothing to download."
        continue
    fi
    preflight "$slot" "$model"
    say "[$slot] downloading $model$(alias_note "$slot") -> $(target_dir "$model")"
    # The original/ folder and *.pth files of Meta's repos are duplicate checkpoints vLLM never reads.
    if [ "$cli" = hf ]; then
        args=(download "$model" --revision "$revision" --cache-dir "$hub_cache" --exclude "original/*" --exclude "*.pth")
    else
        args=(download "$model" --revision "$revision" --cache-dir "$hub_cache" --exclude "original/*" "*.pth")
    fi
    if ! "$cli" "${args[@]}"; then
        die 1 "slot $slot: download of '$model' failed; run the script again to resume."
    fi
    # The guide mounts $HF_HOME itself at the container's hub cache (-v /mnt/models:/root/.cache/
    # huggingface/hub): a relative link per model makes that layout find the files too.
    if [ -n "${HF_HOME:-}" ] && [ "$hub_cache" = "$hf_home/hub" ]; then
        link="$hf_home/models--${model//\//--}"
        if [ -L "$link" ] || [ ! -e "$link" ]; then
            ln -sfn "hub/models--${model//\//--}" "$link"
        fi
    fi
done
say "Done: ${#selected[@]} slot(s) in $hub_cache"
