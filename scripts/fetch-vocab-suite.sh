#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer suite (models/ggml-vocab-*.gguf with their
# .inp/.out test files) from the llama-cpp-python 0.3.36 source distribution
# on PyPI into .cache/llama-vocab/. The sdist is downloaded, not built, and
# checked against the sha256 PyPI lists. Idempotent: does nothing if the suite
# is already there. Prints the directory on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FLEXSERVE_CACHE:-$root/.cache}"
dir="$cache/llama-vocab"
if [ -d "$dir" ]; then
  echo "$dir"
  exit 0
fi
py="$(command -v python3 || command -v python || true)"
if [ -z "$py" ]; then
  echo "fetch-vocab-suite: Python 3 is needed to fetch the suite (install python3 and retry)" >&2
  exit 1
fi
mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch-vocab.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetch-vocab-suite: downloading llama-cpp-python 0.3.36 (sdist) from PyPI" >&2
"$py" - "$work" <<'PY'
import fnmatch, hashlib, json, os, shutil, sys, tarfile, urllib.error, urllib.parse, urllib.request

VERSION = "0.3.36"
PROJECT = "https://pypi.org/pypi/llama-cpp-python/json"
work = sys.argv[1]

def get_json(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r)

# The release's own JSON; some mirrors serve only the project's, which lists every release.
try:
    json_url = f"https://pypi.org/pypi/llama-cpp-python/{VERSION}/json"
    files = get_json(json_url)["urls"]
except urllib.error.HTTPError:
    json_url = PROJECT
    files = get_json(json_url)["releases"][VERSION]
sdists = [f for f in files if f.get("packagetype") == "sdist"]
if len(sdists) != 1:
    sys.exit(f"fetch-vocab-suite: expected one sdist of {VERSION}, found {len(sdists)}")
# The listed URL may be relative to the JSON's.
url = urllib.parse.urljoin(json_url, sdists[0]["url"])
want = sdists[0]["digests"]["sha256"]

archive = os.path.join(work, "sdist.tar.gz")
digest = hashlib.sha256()
with urllib.request.urlopen(url, timeout=120) as src, open(archive, "wb") as dst:
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        dst.write(chunk)
if digest.hexdigest() != want:
    sys.exit(f"fetch-vocab-suite: sha256 of {url} is {digest.hexdigest()}, PyPI lists {want}")

out = os.path.join(work, "llama-vocab")
os.mkdir(out)
found = 0
with tarfile.open(archive, "r:gz") as tar:
    for member in tar:
        if not member.isfile() or not fnmatch.fnmatch(member.name, "*/vendor/llama.cpp/models/ggml-vocab-*"):
            continue
        # Flat names only: nothing in the archive chooses where a file lands.
        name = os.path.basename(member.name)
        with tar.extractfile(member) as src, open(os.path.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        found += name.endswith(".gguf.inp")
if found == 0:
    sys.exit("fetch-vocab-suite: the sdist holds no ggml-vocab-*.gguf.inp files")
os.remove(archive)
PY
# A rename, so the directory is there whole or not at all (mv -T refuses a non-empty target).
mv -T "$work/llama-vocab" "$dir" || [ -d "$dir" ]
echo "$dir"
