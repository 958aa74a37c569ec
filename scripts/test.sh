#!/usr/bin/env bash
# Runs the whole test suite: fetches the real model (once) and the openai
# client package, checks formatting and lints, then runs every test. Works
# offline once they are installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "test: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
scripts/fetch-model.sh >/dev/null
scripts/fetch-vocab-suite.sh >/dev/null
scripts/fetch-model.sh nomic-embed >/dev/null
scripts/fetch-model.sh gemma3 >/dev/null
scripts/fetch-model.sh qwen2.5-coder >/dev/null
# The HTTP API is tested with the clients its users use: the openai package and curl.
# The identity report is verified outside FlexServe's code, with `cryptography`.
if ! python3 -c "import openai, cryptography" >/dev/null 2>&1; then
  echo "== installing the openai and cryptography Python packages (for the HTTP API and identity tests)"
  python3 -m pip install --quiet --disable-pip-version-check openai cryptography
fi
command -v curl >/dev/null 2>&1 || { echo "test: curl is missing (apt-get install curl)" >&2; exit 1; }
# A one-shot build (CI, a fresh clone) gains nothing from incremental
# compilation's caches but about 2 GB of disk; a developer's tree keeps them.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
mkdir -p target
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' target/test-output.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '^test result: .* [0-9]+ failed' target/test-output.log | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
exit "$status"
