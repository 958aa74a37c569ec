#!/usr/bin/env bash
# Builds a bundle that runs the engine comparison on another x86-64 Linux
# machine with nothing installed: static FlexServe binaries (CLI, kernel
# benchmark, kernel tests) and static llama-bench builds of the llama.cpp that
# llama-cpp-python vendors, one per CPU level (AVX2, AVX-512 VNNI, + BF16,
# + AMX); bench/remote/run.sh picks the best one the target runs.
#
#   bench/remote/pack.sh [BUNDLE_DIR]    (default .cache/remote-bundle)
#
# Then copy BUNDLE_DIR to the target and run `bash BUNDLE_DIR/run.sh`; it leaves
# results.tgz (set OUT to choose where) and `python3 summary.py DIR` turns the
# unpacked results into medians and ratios. Takes minutes (llama.cpp compiles
# four times; ccache, if installed, shortens the later builds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bundle="${1:-$root/.cache/remote-bundle}"
work="$root/.cache/remote-build"
llama_version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$bundle" "$work/stage/bin" "$work/stage/tests"

echo "== FlexServe, static"
static_target="$work/target"
export RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --target x86_64-unknown-linux-gnu -p flexserve-cli --target-dir "$static_target" >&2
cp "$static_target/x86_64-unknown-linux-gnu/release/flexserve" "$work/stage/bin/"
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
cargo test --release --target x86_64-unknown-linux-gnu -p flexserve-quant --target-dir "$static_target" \
  --no-run --message-format=json 2>/dev/null | executables | while read -r exe; do
  name=$(basename "$exe"); cp "$exe" "$work/stage/tests/${name%-*}"
done
cargo bench --target x86_64-unknown-linux-gnu -p flexserve-quant --bench kernels --target-dir "$static_target" \
  --no-run --message-format=json 2>/dev/null | executables | while read -r exe; do
  cp "$exe" "$work/stage/bin/kernels"
done
unset RUSTFLAGS

echo "== llama.cpp $llama_version (llama-cpp-python's), static llama-bench per CPU level"
src="$work/llama_cpp_python-$llama_version/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  python3 -m pip install --quiet scikit-build-core cmake ninja >&2
  python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps --no-build-isolation \
    "llama-cpp-python==$llama_version" -d "$work" >&2
  tar xzf "$work/llama_cpp_python-$llama_version.tar.gz" -C "$work"
fi
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
avx512=(-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON)
build_llama() {
  local name=$1; shift
  cmake -S "$src" -B "$work/llama-$name" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
    -DBUILD_SHARED_LIBS=OFF -DGGML_STATIC=ON -DCMAKE_EXE_LINKER_FLAGS=-static -DGGML_NATIVE=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON -DGGML_BMI2=ON "$@" >"$work/llama-$name.log" 2>&1
  ninja -C "$work/llama-$name" llama-bench >>"$work/llama-$name.log" 2>&1 || {
    echo "pack: llama.cpp build '$name' failed, see $work/llama-$name.log" >&2; exit 1; }
  cp "$work/llama-$name/bin/llama-bench" "$work/stage/bin/llama-bench-$name"
}
build_llama avx2
build_llama avx512vnni "${avx512[@]}"
build_llama avx512bf16 "${avx512[@]}" -DGGML_AVX512_BF16=ON
build_llama amx "${avx512[@]}" -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON

echo "== bundle"
strip "$work"/stage/bin/* "$work"/stage/tests/*
tar czf "$bundle/pack.tgz.tmp" -C "$work/stage" bin tests && mv "$bundle/pack.tgz.tmp" "$bundle/pack.tgz"
# A one-layer model that carries the real model's tokenizer: the target
# generates the synthetic models from it (same seeds, so the same files).
model="$(scripts/fetch-model.sh)"
"$work/stage/bin/flexserve" synth --shape 1,64,2,1,128 --quant Q8_0 --tokenizer-from "$model" \
  -o "$bundle/tokenizer-donor.gguf" >&2
cp bench/remote/run.sh bench/remote/summary.py "$bundle/"
du -sh "$bundle"
