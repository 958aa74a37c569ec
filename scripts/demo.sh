#!/usr/bin/env bash
# The main job: fetch the real model and answer a prompt with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet -p flexserve-cli
bin=target/release/flexserve
prompt="${1:-Explain in two sentences why a phone should keep a language model's weights secret.}"
echo "== chat (SmolLM2-135M-Instruct, chat template, greedy)"
echo "user: $prompt"
"$bin" chat --model "$model" --prompt "$prompt" --max-tokens 96 --temperature 0
echo
echo "== raw continuation"
"$bin" generate --model "$model" --prompt "The capital of France is" --max-tokens 32 --temperature 0
