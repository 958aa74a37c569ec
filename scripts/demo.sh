#!/usr/bin/env bash
# The main job: fetch the real model, seal it, answer a prompt from the sealed
# model through the secure world (a separate hardened process with Flex-Mem
# secure memory), next to the plain one, and compare the designs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet -p flexserve-cli -p flexserve-secure
bin=target/release/flexserve
prompt="${1:-Give me three tips for staying healthy.}"
keys=.cache/keys
sealed=.cache/models/SmolLM2-135M-Instruct.Q4_1.fsm
mkdir -p "$keys"
[ -s "$keys/model.key" ] || "$bin" keygen -o "$keys/model.key"
[ -s "$sealed" ] || "$bin" seal --model "$model" --key "$keys/model.key" -o "$sealed"

echo "== sealed model (tensor data encrypted and authenticated chunk by chunk)"
"$bin" inspect "$sealed" | head -n 3
echo
echo "== the secure world: protection, memory, the model resident in it"
"$bin" status --model "$sealed" --key "$keys/model.key"
echo
echo "== chat from the sealed model, answered by the secure world (greedy): $prompt"
"$bin" chat --model "$sealed" --key "$keys/model.key" --prompt "$prompt" --max-tokens 96 --temperature 0
echo
echo "== the same from the plain model (must be identical)"
"$bin" chat --model "$model" --prompt "$prompt" --max-tokens 96 --temperature 0
echo
echo "== raw continuation from the sealed model"
"$bin" generate --model "$sealed" --key "$keys/model.key" --prompt "The capital of France is" --max-tokens 32 --temperature 0
echo
echo "== designs side by side: time to first token and decode speed (plain, secure world with"
echo "   Flex-Mem, static carve-out, locked memory); every run starts from nothing"
"$bin" bench secure --model "$sealed" --plain "$model" --key "$keys/model.key" --prompt-tokens 64 --gen-tokens 16 \
    --repetitions "${DEMO_REPETITIONS:-3}" --threads 2
