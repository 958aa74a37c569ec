#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of the parsers that face
# hostile input: GGUF and sealed-model headers, the world-boundary protocol
# (requests and replies, decoded then re-encoded byte for byte), tokenizers
# built from hostile metadata, the real model's tokenizer, chat templates and the HTTP API's request bodies.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   # default: 60 seconds, every target
#
# Each target runs SECONDS seconds with AddressSanitizer (leak detection on)
# and debug assertions. The run fails if any target crashes (a panic, an
# assertion, a sanitizer report), leaks, runs one input longer than 10 s, or
# goes over 2 GiB RSS; all targets run before it fails.
#
# Where things go (all under fuzz/, none of it tracked by git):
#   fuzz/artifacts/<target>/   inputs that crashed (crash-*), leaked (leak-*),
#                              timed out (timeout-*) or ran out of memory (oom-*);
#                              replay one with `cargo fuzz run <target> FILE`
#                              (with RUSTC_BOOTSTRAP=1, see below)
#   fuzz/corpus-new/<target>/  new inputs that reached new coverage; the seeds
#                              in fuzz/corpus/<target>/ (tracked) are only read
#   fuzz/logs/<target>.log     libFuzzer's output
#
# Toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address and
# friends). Where the default toolchain is stable, RUSTC_BOOTSTRAP=1 (exported
# below) is the documented escape hatch that lets a stable rustc accept them;
# stable ships the sanitizer runtimes. It is harmless on a nightly toolchain.
# cargo-fuzz itself is installed from crates.io if missing; libfuzzer-sys
# builds libFuzzer from C++ source, so a C++ compiler is needed.
# FUZZ_SANITIZER=none skips AddressSanitizer (faster builds and runs, finds
# only panics, hangs and memory blow-ups).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
  exit 2
fi
sanitizer=${FUZZ_SANITIZER:-address}

if ! command -v cargo >/dev/null 2>&1; then
  echo "fuzz: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

# tokenizer_encode builds its tokenizer from the real model.
scripts/fetch-model.sh >/dev/null

cd fuzz
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
flags=(--sanitizer "$sanitizer" --debug-assertions)

echo "== building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build "${flags[@]}"

mkdir -p logs
failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus-new/$target" "corpus/$target" "artifacts/$target"
  log="logs/$target.log"
  echo "== fuzzing $target for ${seconds}s"
  set +e
  cargo fuzz run "${flags[@]}" "$target" "$root/fuzz/corpus-new/$target" "$root/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 \
    -print_final_stats=1 -artifact_prefix="$root/fuzz/artifacts/$target/" >"$log" 2>&1
  status=$?
  set -e
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)
  speed=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 || true)
  if [ "$status" -eq 0 ]; then
    echo "   ok: ${runs:-?} runs, ${speed:-?}/s, ${cov:-cov: ?}"
  else
    echo "   FAILED (exit $status); log fuzz/$log; inputs in fuzz/artifacts/$target/:" >&2
    grep -E '^(==[0-9]+==|thread .* panicked|.*(deadly signal|Test unit written|ERROR: libFuzzer))' "$log" | head -20 >&2 || true
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash, leak or timeout"
