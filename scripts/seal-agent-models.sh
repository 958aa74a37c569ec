#!/usr/bin/env bash
# Sets up examples/workflows/code-agent.toml: fetches its three real models
# (SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-1.5B; about 1.4 GB, once, each
# checksum verified) and seals Gemma and Qwen with the demo's benchmark key
# into .cache/demo/bench (FLEXSERVE_CACHE overrides .cache), where the
# example's paths point. Does nothing for a file that is already there.
#
#   scripts/seal-agent-models.sh
#   FLEXSERVE_HOME=.cache/demo/bench FLEXSERVE_DEV=1 target/release/flexserve bench workflow \
#       examples/workflows/code-agent.toml --key .cache/demo/bench/model.key --threads 2
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bench_home="${FLEXSERVE_CACHE:-$root/.cache}/demo/bench"
mkdir -p "$bench_home"
cargo build --release -q -p flexserve-cli
bin="$root/target/release/flexserve"
scripts/fetch-model.sh smollm2 >/dev/null
gemma=$(scripts/fetch-model.sh gemma3)
qwen=$(scripts/fetch-model.sh qwen2.5-coder)
[ -s "$bench_home/model.key" ] || FLEXSERVE_HOME="$bench_home" "$bin" keygen -o "$bench_home/model.key"
for pair in "gemma:$gemma" "qwen:$qwen"; do
  name=${pair%%:*}
  model=${pair#*:}
  out="$bench_home/$name.fsm"
  # `seal` writes a temporary file and renames it: an interrupted run leaves no half-sealed model.
  [ -s "$out" ] || FLEXSERVE_HOME="$bench_home" "$bin" seal --model "$model" --key "$bench_home/model.key" -o "$out"
  echo "$out"
done
