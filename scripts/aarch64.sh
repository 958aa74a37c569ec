#!/usr/bin/env bash
# Cross-builds FlexServe for aarch64 Linux (a phone's or a board's CPU) on an
# x86-64 Debian/Ubuntu machine, and runs tests under qemu-user.
#
#   scripts/aarch64.sh build   # release flexserve, flexserve-secure, flexserve-launcher
#   scripts/aarch64.sh check   # what CI runs: clippy -D warnings on every crate
#                              # and target for aarch64 (the NEON kernels and the
#                              # aarch64 seccomp table are compiled only there),
#                              # then the three binaries built and linked (debug)
#   scripts/aarch64.sh test    # the tests below, under qemu-aarch64
#
# Installs what is missing: gcc-aarch64-linux-gnu and libc6-dev-arm64-cross
# (the linker and the C library; ring's C code needs the compiler too),
# qemu-user (or qemu-user-static) for `test`, and the Rust target. Uses its
# own target dir (target/aarch64, or $FLEXSERVE_AARCH64_TARGET_DIR), so host
# builds in target/ are untouched.
#
# What `test` runs, each under user-mode emulation (qemu-aarch64 translates
# the aarch64 code and hands its system calls to the x86-64 host kernel):
#  - flexserve-quant: all its tests (unit, integration, doc tests). aarch64
#    has two NEON tiers, picked at run time: `neon` (widening multiplies)
#    and `neon-dot` (plus the dot-product instructions, `sdot`, where the
#    CPU has them): the Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K/Q6_K dots
#    (and the GEMV and tile products, which loop them) and the Q8_0/Q8_1/
#    Q8_K activation quantizers; the rest (dequantization, weight
#    quantizers, float formats, rearranged layouts) is portable. The tests
#    compare every tier the emulated CPU runs with the portable kernels bit
#    for bit. qemu's default CPU (`max`) has `dotprod`, so both tiers run;
#    FLEXSERVE_AARCH64_CPU=cortex-a53 emulates one without it (then only
#    `neon`).
#  - flexserve-tokenizer: all its tests (the real model's tokenizer too).
#  - flexserve-engine: its unit tests (the GELU table's is llama.cpp's x86-64
#    table and is skipped: aarch64's libm rounds some tanhf values
#    differently, as llama.cpp's aarch64 build would), and from
#    tests/llama_cpp_reference.rs the greedy continuations of SmolLM2 against
#    llama.cpp's, at every tier the CPU runs, on a subset of the cases
#    (FLEXSERVE_REFERENCE_SUBSET, below: every case and token of SmolLM2 at
#    three tiers ran over 38 minutes under emulation on a 2-core host without
#    finishing; FLEXSERVE_REFERENCE_MODELS picks the models). The
#    perplexity test (5,120 tokens of prefill) took 83 minutes under
#    emulation on a 2-core x86-64 machine (it passes: PPL 14.8819, as with
#    the portable kernels on x86-64), so it runs only with
#    FLEXSERVE_AARCH64_PERPLEXITY=1.
#  - flexserve-secure: the seccomp table's unit tests for aarch64 (no call
#    appears twice, the forbidden calls are not in it, seccompiler compiles
#    it to BPF for AUDIT_ARCH_AARCH64), and `flexserve-secure
#    --self-test-seccomp`.
#
# What is NOT exercised: the seccomp filter in force. qemu-user implements
# no seccomp(2) (ENOSYS) and refuses prctl(PR_SET_SECCOMP): a filter would
# apply to qemu itself, whose system calls are the host's x86-64 ones. The
# self-test therefore cannot install the filter under emulation, and the
# script reports that as NOT EXERCISED, never as a pass. Nor can the secure
# world start unaided: qemu 7.2 has neither memfd_secret nor mlock2, so its
# secure heap finds no locked memory; the script preloads a shim into the
# emulated process that makes mlock2 a plain mlock (for qemu only; the
# product is unchanged). That the aarch64 filter lets the secure world work
# and stops what it forbids can only be shown on an aarch64 kernel (the
# hardware or a full-system VM): run `flexserve-secure --self-test-seccomp`
# and `cargo test -p flexserve-secure` there. Tests that start other
# programs (the secure world's, the server's) are not run: under qemu-user
# a child is executed natively, which fails for an aarch64 binary unless
# binfmt_misc is set up.
#
# No speed figure may come from here: emulation is many times slower than
# the hardware, and differently so for each kind of code.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root_dir=$(pwd)
mode=${1:-}
case "$mode" in
  build | check | test) ;;
  *)
    echo "usage: scripts/aarch64.sh build|check|test" >&2
    exit 2
    ;;
esac

triple=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "aarch64: needs root to run: $*" >&2
    exit 1
  fi
}

qemu_bin() {
  command -v qemu-aarch64 || command -v qemu-aarch64-static || true
}

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
[ -e "$sysroot/lib/libc.so" ] || missing+=(libc6-dev-arm64-cross)
if [ "$mode" = test ] && [ -z "$(qemu_bin)" ]; then
  missing+=(qemu)
fi
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "aarch64: missing ${missing[*]} and no apt-get to install them" >&2
    exit 1
  }
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  packages=()
  for p in "${missing[@]}"; do
    if [ "$p" = qemu ]; then
      # Debian and Ubuntu have both; either provides qemu-aarch64(-static).
      if apt-cache show qemu-user >/dev/null 2>&1; then p=qemu-user; else p=qemu-user-static; fi
    fi
    packages+=("$p")
  done
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -qx "$triple"; then
  echo "== rustup target add $triple"
  rustup target add "$triple"
fi

export CARGO_TARGET_DIR=${FLEXSERVE_AARCH64_TARGET_DIR:-$root_dir/target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# For crates that compile C or assembly (ring).
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

if [ "$mode" = build ]; then
  start=$(date +%s)
  cargo build --release --target "$triple" \
    -p flexserve-cli --bin flexserve \
    -p flexserve-secure --bin flexserve-secure \
    -p flexserve-launcher --bin flexserve-launcher
  out="$CARGO_TARGET_DIR/$triple/release"
  echo "== built in $(($(date +%s) - start)) s:"
  for bin in flexserve flexserve-secure flexserve-launcher; do
    echo "   $out/$bin"
  done
  exit 0
fi

if [ "$mode" = check ]; then
  # As in scripts/test.sh: a one-shot build keeps no incremental caches.
  if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
  fi
  start=$(date +%s)
  echo "== cargo clippy --target $triple"
  cargo clippy --target "$triple" --workspace --all-targets --quiet -- -D warnings
  echo "== cargo build --target $triple (flexserve, flexserve-secure, flexserve-launcher)"
  cargo build --target "$triple" --quiet \
    -p flexserve-cli --bin flexserve \
    -p flexserve-secure --bin flexserve-secure \
    -p flexserve-launcher --bin flexserve-launcher
  echo "== aarch64: clippy clean and binaries linked in $(($(date +%s) - start)) s"
  exit 0
fi

qemu=$(qemu_bin)
cpu_args=()
if [ -n "${FLEXSERVE_AARCH64_CPU:-}" ]; then
  cpu_args=(-cpu "$FLEXSERVE_AARCH64_CPU")
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu ${cpu_args[*]} -L $sysroot"
# The model the tokenizer's and the engine's reference tests read.
scripts/fetch-model.sh >/dev/null || echo "aarch64: no model; the tests that need it will say so" >&2

logs="$CARGO_TARGET_DIR/logs"
mkdir -p "$logs"
results=()
failures=0

# step NAME COMMAND...: runs it, keeps its output in $logs/NAME.log, and
# records PASS/FAIL with the test counts and the time taken.
step() {
  local name=$1
  shift
  local log="$logs/$name.log" start status counts
  echo "== $name: $*"
  start=$(date +%s)
  set +e
  "$@" >"$log" 2>&1
  status=$?
  set -e
  counts=$(awk '/^test result:/ {p+=$4; f+=$6; i+=$8} END {printf "%d passed, %d failed, %d ignored", p, f, i}' "$log")
  local took=$(($(date +%s) - start))
  if [ "$status" = 0 ]; then
    results+=("PASS  $name: $counts (${took} s)")
  else
    failures=$((failures + 1))
    results+=("FAIL  $name: $counts, exit $status (${took} s; see $log)")
    tail -n 30 "$log" >&2
  fi
}

ct() {
  cargo test --target "$triple" "$@"
}

# The greedy reference under emulation: the first short prompts, one long
# one (tiled prefill and attention) and the first tokens of each, at every
# tier; FLEXSERVE_REFERENCE_SUBSET= (empty) compares every case and token.
reference_subset="short=6,long=1,tokens=16"

step quant ct -p flexserve-quant
step tokenizer ct -p flexserve-tokenizer
step engine-unit ct -p flexserve-engine --lib
FLEXSERVE_REFERENCE_MODELS=SmolLM2 \
  FLEXSERVE_REFERENCE_SUBSET=${FLEXSERVE_REFERENCE_SUBSET-$reference_subset} \
  step engine-llama-cpp-greedy ct -p flexserve-engine --test llama_cpp_reference greedy_continuations_match_llama_cpp
if [ "${FLEXSERVE_AARCH64_PERPLEXITY:-0}" = 1 ]; then
  step engine-llama-cpp-perplexity ct -p flexserve-engine --test llama_cpp_reference perplexity_within_one_percent_of_llama_cpp
else
  results+=("SKIP  engine-llama-cpp-perplexity (over an hour under emulation; FLEXSERVE_AARCH64_PERPLEXITY=1 runs it)")
fi
step seccomp-table ct -p flexserve-secure --lib seccomp::

# The self-test installs the filter and probes what it forbids; under
# qemu-user it starts only with the mlock2 shim and then cannot install the
# filter (see the top of this file).
echo "== seccomp-self-test: flexserve-secure --self-test-seccomp"
selftest_log="$logs/seccomp-self-test.log"
shim="$CARGO_TARGET_DIR/qemu-shim/mlock2-as-mlock.so"
mkdir -p "$(dirname "$shim")"
printf '%s\n' '#include <stddef.h>' '#include <sys/mman.h>' \
  'int mlock2(const void *addr, size_t len, unsigned int flags) { (void)flags; return mlock(addr, len); }' \
  >"${shim%.so}.c"
set +e
{
  aarch64-linux-gnu-gcc -shared -fPIC -O1 -o "$shim" "${shim%.so}.c" &&
    cargo build --quiet --release --target "$triple" -p flexserve-secure --bin flexserve-secure &&
    "$qemu" "${cpu_args[@]}" -L "$sysroot" -E LD_PRELOAD="$shim" "$CARGO_TARGET_DIR/$triple/release/flexserve-secure" --self-test-seccomp
} >"$selftest_log" 2>&1
status=$?
set -e
if [ "$status" = 0 ] && head -n 1 "$selftest_log" | grep -qx "thread ok" \
  && ! tail -n +2 "$selftest_log" | grep -Ev '^(clone3 errno 38|.* errno 1)$' | grep -q .; then
  results+=("PASS  seccomp-self-test: filter installed, threads work, every probe denied")
elif grep -q "installing seccomp filter.*os error 38" "$selftest_log"; then
  results+=("NOT EXERCISED  seccomp-self-test: started, but qemu-user cannot install a seccomp filter (seccomp(2): ENOSYS); needs an aarch64 kernel")
else
  failures=$((failures + 1))
  results+=("FAIL  seccomp-self-test: exit $status (see $selftest_log)")
  cat "$selftest_log" >&2
fi

echo
echo "== aarch64 under $($qemu --version | head -n 1) (emulated: no timing here says anything about speed)"
for r in "${results[@]}"; do
  echo "$r"
done
exit $((failures > 0))
