#!/usr/bin/env python3
"""Records llama.cpp's greedy continuations of a set of prompts, as the engine's
reference tests read them (crates/flexserve-engine/tests/reference/greedy-*.json).

llama.cpp runs through llama-cpp-python with llama.cpp's own defaults: flash
attention on, the model's special tokens added, special-token text in the prompt
parsed. Build the binding without AMX, which llama.cpp's default CPU builds do not
use and which changes its rounding:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \\
    -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install llama-cpp-python==0.3.36

For every generated position it also records llama.cpp's gap between its two
highest logits: the test forgives a different pick only where that gap is a near tie.

  python3 bench/record_reference.py --model M.gguf --prompts prompts.json --out greedy-NAME.json
"""
import argparse
import hashlib
import json
import os
import tempfile

import numpy as np


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="a JSON list of prompt strings (raw text, templates written out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    prompts = json.load(open(a.prompts))
    # verbose=True: this binding's quiet mode crashes on some builds; its log goes to stderr.
    llm = Llama(model_path=a.model, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                flash_attn=True, logits_all=False, verbose=True)
    cases = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        continuation, gaps = [], []
        for _ in range(a.n_predict):
            # The last evaluated position's logits, straight from llama.cpp.
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()
            top2 = np.partition(logits, -2)[-2:]
            best = int(np.argmax(logits))
            continuation.append(best)
            gaps.append(round(float(top2[1] - top2[0]), 5))
            if best == llm.token_eos():
                break
            llm.eval([best])
        cases.append({"prompt": prompt, "prompt_ids": ids, "continuation_ids": continuation, "top2_gaps": gaps})
    record = {
        "model": os.path.basename(a.model),
        "model_sha256": sha256(a.model),
        "source": f"llama.cpp from llama-cpp-python {llama_cpp.__version__} (CPU, AVX-512, no AMX), "
                  "flash attention on, greedy; bench/record_reference.py",
        "n_predict": a.n_predict,
        "cases": cases,
    }
    # One case per line: the file stays readable and its diffs small.
    head = {k: v for k, v in record.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n'
    text += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n ]\n}\n"
    json.loads(text)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".part") as f:
        f.write(text)
        tmp = f.name
    os.chmod(tmp, 0o644)  # a temporary file is its owner's alone; the reference is for everyone
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
