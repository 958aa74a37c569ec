#!/usr/bin/env bash
# The main job: fetch the real model, seal it to this device's secure world,
# answer a prompt from the sealed model through the secure world, next to the
# plain one, and compare the designs.
#
# As root it runs the real set-up: the secure world as its own principal
# (its own uid, started by flexserve-launcher, keys in a directory only it
# reads) and the normal world as an ordinary user, `flexserve-demo`, in the
# group the secure world serves. Without root it falls back to development
# mode, which protects nothing and says so on every run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet -p flexserve-cli -p flexserve-secure -p flexserve-launcher
bin="$PWD/target/release/flexserve"
prompt="${1:-Give me three tips for staying healthy.}"
work="$PWD/.cache/demo"
mkdir -p "$work"
chmod 755 "$work"

if [ "$(id -u)" = 0 ]; then
  user=flexserve-demo
  scripts/secure-world.sh start "$user"
  home="$work/home-$user"
  mkdir -p "$home"
  chown "$user:$user" "$home"
  # The normal world: an ordinary user, no privilege, no key file.
  as_user() {
    setpriv --reuid "$user" --regid "$user" --init-groups -- \
      env HOME="$home" FLEXSERVE_HOME="$home" FLEXSERVE_SECURE_SOCKET="${FLEXSERVE_SECURE_SOCKET:-/run/flexserve/secure.sock}" \
      "$bin" "$@"
  }
  echo "== the secure world runs as its own principal (uid $(id -u flexserve-secure)); the normal world is $user"
else
  echo "== not root: development mode (an UNPROTECTED secure world as your own user)"
  export FLEXSERVE_DEV=1
  as_user() { "$bin" "$@"; }
  home="${FLEXSERVE_HOME:-$HOME/.flexserve}"
fi
sealed="$home/SmolLM2-135M-Instruct.Q4_1.fsm"

echo "== this device's public key (the device key was born in the secure world and never leaves it)"
device_key="$(as_user device-key)"
echo "$device_key"
[ -s "$sealed" ] || as_user seal --model "$model" --to "$device_key" -o "$sealed"
echo
echo "== sealed model (tensor data encrypted and authenticated chunk by chunk, model key wrapped to this device)"
as_user inspect "$sealed" | head -n 3
echo
echo "== the secure world: who it is, its policy, protection, memory, the model opened in it (its weights load with the first request)"
as_user status --model "$sealed"
echo
echo "== chat from the sealed model, answered by the secure world (greedy): $prompt"
printf '%s' "$prompt" | as_user chat --model "$sealed" --prompt-file - --max-tokens 96 --temperature 0
echo
echo "== the same from the plain model (must be identical)"
as_user chat --model "$model" --prompt "$prompt" --max-tokens 96 --temperature 0
echo
echo "== raw continuation from the sealed model"
echo "The capital of France is" | as_user generate --model "$sealed" --prompt-file - --max-tokens 32 --temperature 0
echo
echo "== the same sealed model behind the OpenAI-compatible HTTP API (flexserve serve; curl as the client)"
serve_out="$(mktemp)"
# With the service, a reserve of protected memory prepared at start serves the model's first load.
reserve=()
[ "$(id -u)" = 0 ] && reserve=(--secure-reserve 128M)
as_user serve --port 0 --model smol-sealed="$sealed" "${reserve[@]}" >"$serve_out" 2>/dev/null &
serve_pid=$!
for _ in $(seq 100); do grep -q listening "$serve_out" && break; sleep 0.1; done
url="$(sed -n 's/^listening on //p' "$serve_out")"
curl -sS "$url/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"smol-sealed","messages":[{"role":"user","content":"Name three colours."}],"max_tokens":32,"temperature":0}'
echo
pkill -TERM -P "$serve_pid" 2>/dev/null || true
kill -TERM "$serve_pid" 2>/dev/null || true
wait "$serve_pid" 2>/dev/null || true
rm -f "$serve_out"
echo
echo "== the paper's designs side by side: time to first token from a sealed model whose weights are not"
echo "   resident (model-cold: the secure world up and idle, the file in the page cache): plain engine,"
echo "   strawman (carve-out at request time, load everything, then compute), opt-strawman (carve-out,"
echo "   pipelined load), flexserve (Flex-Mem reserve prepared ahead, pipelined load); every run starts a"
echo "   development secure world of its own; timelines in $work/bench/timelines"
bench_home="$work/bench"
mkdir -p "$bench_home"
[ -s "$bench_home/model.key" ] || FLEXSERVE_HOME="$bench_home" "$bin" keygen -o "$bench_home/model.key"
[ -s "$bench_home/model.fsm" ] ||
  FLEXSERVE_HOME="$bench_home" "$bin" seal --model "$model" --key "$bench_home/model.key" -o "$bench_home/model.fsm"
FLEXSERVE_HOME="$bench_home" FLEXSERVE_DEV=1 "$bin" bench ttft --model "$bench_home/model.fsm" --plain "$model" \
  --key "$bench_home/model.key" --scenario model-cold --prompt-tokens 128 --gen-tokens 16 \
  --repetitions "${DEMO_REPETITIONS:-3}" --threads 2 --timeline "$bench_home/timelines"
echo
echo "== a multi-model workflow (examples/workflows/plan-execute-summarize.toml): a sealed planner, a plain"
echo "   executor and a sealed summarizer under a 160 MiB secure memory budget, each step streamed"
FLEXSERVE_HOME="$bench_home" FLEXSERVE_DEV=1 "$bin" workflow run examples/workflows/plan-execute-summarize.toml \
  --input "How do I make a cup of tea?" --key "$bench_home/model.key" --threads 2
echo
echo "== the same workflow under the paper's designs side by side (end to end, per-step first token)"
FLEXSERVE_HOME="$bench_home" FLEXSERVE_DEV=1 "$bin" bench workflow examples/workflows/plan-execute-summarize.toml \
  --key "$bench_home/model.key" --repetitions "${DEMO_REPETITIONS:-3}" --threads 2
if [ "$(id -u)" = 0 ]; then
  echo
  echo "The secure world service keeps running (scripts/secure-world.sh status); stop it with scripts/secure-world.sh stop."
fi
