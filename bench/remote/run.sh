#!/usr/bin/env bash
# Runs on the target machine, from a bundle made by bench/remote/pack.sh: the
# kernel tests, the kernel benchmarks of the SIMD tiers, then per model
# FlexServe and llama.cpp side by side (and FlexServe on AVX2 where the CPU
# has AVX-512), both pinned to the same cores. Models are generated here.
# Results go to results/ and, packed after every step, to $OUT/results.tgz
# (default: the bundle directory), so an interrupted run still leaves them.
#
#   [MODELS="1b:Q4_0 3b:Q4_K_M"] [THREADS=2] [REPS=5] [PROMPT=128] [GEN=32] \
#   [KERNELS=REGEX] [TIERS=0] bash run.sh
#
# PROMPT takes a comma list (128,512); KERNELS picks the kernel benchmarks
# (criterion's filter); TIERS=0 skips FlexServe's AVX2 run on AVX-512 CPUs.
cd "$(dirname "$0")"
here=$(pwd)
final=${OUT:-$here}
res=$here/results
mkdir -p "$res" "$final" models
pack() { tar czf "$final/results.tgz.tmp" -C "$res" . && mv "$final/results.tgz.tmp" "$final/results.tgz"; }
log() { echo "[$(date +%T)] $*" | tee -a "$res/log.txt"; pack; }
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }
MODELS=${MODELS:-"1b:Q4_0 1b:Q4_1 1b:Q8_0 1b:Q4_K_M 3b:Q4_0 3b:Q4_K_M"}
THREADS=${THREADS:-2} REPS=${REPS:-5} PROMPT=${PROMPT:-128} GEN=${GEN:-32}
KERNELS=${KERNELS:-'packed/.*/Avx|tile/Q[46]_K/Avx'} TIERS=${TIERS:-1}

tar xzf pack.tgz || { log "cannot unpack pack.tgz"; exit 1; }
{ lscpu; nproc; uname -a; } > "$res/cpu.txt" 2>&1
flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
has() { [[ $flags == *" $1 "* ]]; }
llama=""
has avx2 && has fma && has f16c && llama=avx2
has avx512_vnni && has avx512vbmi && llama=avx512vnni
[ "$llama" = avx512vnni ] && has avx512_bf16 && llama=avx512bf16
[ "$llama" = avx512bf16 ] && has amx_int8 && llama=amx
# THREADS cores, one per physical core where the topology says so.
cores=$(for c in /sys/devices/system/cpu/cpu[0-9]*; do
  echo "$(basename "$c" | tr -d cpu) $(cat "$c/topology/core_id" 2>/dev/null) $(cat "$c/topology/physical_package_id" 2>/dev/null)"
done | sort -n | awk '!seen[$2" "$3]++ {print $1}' | head -n "$THREADS" | paste -sd, -)
pin=()
command -v taskset >/dev/null && [ -n "$cores" ] && pin=(taskset -c "$cores")
log "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); llama.cpp build $llama; cores ${cores:-any}"

name_of() { echo "${1%%:*}-${1##*:}" | tr 'A-Z,' 'a-zx'; }
( for m in $MODELS; do
    n=$(name_of "$m")
    [ -f "models/$n.gguf" ] || { bin/flexserve synth --shape "${m%%:*}" --quant "${m##*:}" \
      --tokenizer-from tokenizer-donor.gguf -o "models/$n.tmp" && mv "models/$n.tmp" "models/$n.gguf"; }
    echo "$n ready at $(elapsed)"
  done ) > "$res/synth.txt" 2>&1 &
synth=$!
for t in tests/*; do
  timeout 300 "$t" > "$res/test-$(basename "$t").txt" 2>&1
  echo "$(basename "$t") exit $?" >> "$res/tests.txt"
done
log "tests: $(grep -c 'exit 0' "$res/tests.txt") of $(ls tests | wc -l) passed ($(elapsed))"
wait $synth
log "models ready ($(elapsed))"
timeout 300 bin/kernels --bench "$KERNELS" --noplot > "$res/kernels.txt" 2>&1
log "kernel benchmarks done ($(elapsed))"

# The first working llama.cpp build, from the best this CPU could run down.
first="models/$(name_of "${MODELS%% *}").gguf"
for build in $llama avx512bf16 avx512vnni avx2; do
  if bin/llama-bench-$build -m "$first" -t "$THREADS" -p 16 -n 4 -r 1 > "$res/llama-smoke-$build.txt" 2>&1; then
    llama=$build; break
  fi
  log "llama-bench-$build does not run here (exit $?)"
done
log "llama.cpp build used: $llama"

fs() {
  "${pin[@]}" bin/flexserve bench engine --model "$1" --threads "$THREADS" --prompt-tokens "$PROMPT" \
    --gen-tokens "$GEN" --repetitions "$REPS" --json "${@:3}" > "$res/$2.json" 2> "$res/$2.err"
}
for m in $MODELS; do
  n=$(name_of "$m")
  model="models/$n.gguf"
  [ -f "$model" ] || { log "$n: no model"; continue; }
  fs "$model" "fs-$n"
  "${pin[@]}" bin/llama-bench-$llama -m "$model" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$REPS" -o json \
    > "$res/llama-$n.json" 2> "$res/llama-$n.err"
  if has avx512_vnni && [ "$TIERS" = 1 ]; then fs "$model" "fs-avx2-$n" --isa avx2; fi
  log "$n done ($(elapsed))"
done
log "all done ($(elapsed))"
