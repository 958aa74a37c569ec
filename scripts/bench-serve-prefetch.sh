#!/usr/bin/env bash
# End-to-end time of a workflow through the daemon (`POST /v1/workflows/run`)
# with and without the prefetch of the next step's model (`flexserve serve
# --no-prefetch`). Two development daemons serve the workflow side by side;
# each round unloads every model of both, then runs the workflow once on
# each, their order alternating, so every run starts cold (nothing loaded,
# the files in the page cache). Prints one line per run and the best of each.
#
#   scripts/bench-serve-prefetch.sh [WORKFLOW.toml] [ROUNDS] [INPUT]
#
# Needs the release build (cargo build --release -p flexserve-cli -p
# flexserve-secure) and the demo's sealed model and key in .cache/demo/bench.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
workflow="${1:-examples/workflows/plan-execute-summarize.toml}"
rounds="${2:-4}"
input="${3:-Write a haiku about autumn}"
bin="$PWD/target/release/flexserve"
key="$PWD/.cache/demo/bench/model.key"
name="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$workflow" | head -1)"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start LABEL [OPTIONS...]: a daemon in a home of its own; sets url_LABEL.
start() {
  local label="$1"
  shift
  mkdir -p "$work/$label"
  FLEXSERVE_HOME="$work/$label" FLEXSERVE_DEV=1 "$bin" serve --port 0 --key "$key" --workflow "$workflow" "$@" \
    >"$work/$label.out" 2>"$work/$label.log" &
  pids+=($!)
  for _ in $(seq 200); do
    if grep -q '^listening on ' "$work/$label.out"; then break; fi
    sleep 0.1
  done
  printf -v "url_$label" '%s' "$(sed -n 's/^listening on //p' "$work/$label.out")"
}
start prefetch
start none --no-prefetch

unload_all() {
  local url="$1"
  for m in $(curl -sf "$url/v1/models" | jq -r '.data[].id'); do
    curl -sf -H 'Content-Type: application/json' --data "{\"model\":\"$m\"}" "$url/models/unload" >/dev/null
  done
}

body="$(jq -nc --arg w "$name" --arg i "$input" '{workflow: $w, input: $i}')"
declare -A best
run() {
  local label="$1" url_var="url_$1"
  local url="${!url_var}"
  unload_all "$url"
  # Unloaded sessions end on threads of their own: let them finish first.
  sleep 1
  local report ms
  report="$(curl -sf -H 'Content-Type: application/json' --data "$body" "$url/v1/workflows/run")"
  ms="$(jq -r '.total_ms | floor' <<<"$report")"
  echo "$label: ${ms} ms;" "$(jq -r '[.steps[] | "\(.name) \(.model_state) wait \(.load_wait_ms | floor) ms first token \(.first_token_ms | floor) ms"] | join("; ")' <<<"$report")"
  if [ -z "${best[$label]:-}" ] || [ "$ms" -lt "${best[$label]}" ]; then best[$label]="$ms"; fi
  echo "$report" | jq -c '[.steps[].output]' >"$work/$label.outputs"
}

for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run prefetch; run none; else run none; run prefetch; fi
  cmp -s "$work/prefetch.outputs" "$work/none.outputs" || echo "round $r: the outputs differ"
done
echo "best of $rounds: prefetch ${best[prefetch]} ms, none ${best[none]} ms"
echo "prefetches (prefetch daemon): $(curl -sf "$url_prefetch/metrics" | grep '^flexserve_prefetches' | tr '\n' ' ')"
