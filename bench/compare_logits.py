#!/usr/bin/env python3
"""Logits of FlexServe against llama.cpp (llama-cpp-python, default settings: weight
repacking on, flash attention on unless --no-flash-attn) on the same GGUF file: a
prompt evaluated as one batch (every position) and single-token decode steps.

Needs the `dump_logits` example built in release mode:
  cargo build --release -p flexserve-engine --example dump_logits
  python3 bench/compare_logits.py --model M.gguf [--dump target/release/examples/dump_logits]
  python3 bench/compare_logits.py --model M.gguf --prompt "def fibonacci(n):" --last-only --isa avx2 2>/dev/null

With --prompt and --last-only both engines compute as they do when generating
(only the last row's logits; llama.cpp's last layer then feeds only that row on),
which is what the greedy reference tests compare.
"""
import argparse
import json
import subprocess
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--prompt", help="a prompt (tokenized by llama.cpp, special tokens parsed) instead of "
                    "deterministic ids; decode steps then follow llama.cpp's greedy picks")
    ap.add_argument("--last-only", action="store_true",
                    help="compare the prompt's last row only, computed as generation computes it (llama.cpp "
                         "without logits for every row, FlexServe with Logits::Last)")
    ap.add_argument("--isa", help="FlexServe's kernel tier: portable, avx2 or avx512")
    ap.add_argument("--dump", default=str(Path(__file__).resolve().parent.parent / "target/release/examples/dump_logits"))
    a = ap.parse_args()

    import os

    import llama_cpp
    from llama_cpp import Llama

    if a.prompt is not None:
        probe = Llama(model_path=a.model, n_ctx=64, vocab_only=True, verbose=True)
        prompt = probe.tokenize(a.prompt.encode(), add_bos=True, special=True)
        a.prompt_tokens = len(prompt)
    llm = Llama(model_path=a.model, n_ctx=max(a.prompt_tokens, 64) + a.decode_tokens + 16,
                n_batch=max(a.prompt_tokens, 64), n_ubatch=max(a.prompt_tokens, 64), n_threads=a.threads,
                n_threads_batch=a.threads, flash_attn=not a.no_flash_attn, logits_all=not a.last_only, verbose=True)
    n_vocab = llm.n_vocab()

    def last_logits():
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()

    if a.prompt is None:
        # Deterministic ids (as bench/compare_llama_cpp.py), decode ids continuing the sequence.
        ids = [(i * 7919 + 13) % n_vocab for i in range(a.prompt_tokens + a.decode_tokens)]
        prompt, decode = ids[:a.prompt_tokens], ids[a.prompt_tokens:]
    llm.reset()
    llm.eval(prompt)
    ll_prefill = np.array([last_logits()] if a.last_only else llm.scores[:a.prompt_tokens], dtype=np.float32)
    ll_decode = []
    if a.prompt is not None:
        decode = []
    for i in range(a.decode_tokens):
        if a.prompt is not None:
            # llama.cpp's greedy pick from the previous position.
            decode.append(int(np.argmax(ll_decode[-1] if ll_decode else ll_prefill[-1])))
        llm.eval([decode[i]])
        ll_decode.append(last_logits())
    ll_decode = np.array(ll_decode)

    env = dict(os.environ)
    if a.last_only:
        env["FLEXSERVE_LAST"] = "1"
    if a.isa:
        env["FLEXSERVE_ISA"] = a.isa
    out = subprocess.run([a.dump, a.model, ",".join(map(str, prompt)), ",".join(map(str, decode)), str(a.threads)],
                         check=True, capture_output=True, text=True, env=env)
    fs = json.loads(out.stdout)
    fs_prefill = np.array(fs["prefill"], dtype=np.float32)
    fs_decode = np.array(fs["decode"], dtype=np.float32)

    def report(name, x, y):
        d = np.abs(x - y)
        print(f"{name:<8} max |diff| {d.max():.3e}  mean |diff| {d.mean():.3e}  max |logit| {np.abs(y).max():.2f}  "
              f"argmax agree {int((x.argmax(-1) == y.argmax(-1)).sum())}/{len(x)}")

    print(f"model: {a.model}  prompt {a.prompt_tokens} tokens, {a.decode_tokens} decode steps, "
          f"llama.cpp flash attention {'off' if a.no_flash_attn else 'on'}"
          f"{', last row only' if a.last_only else ''}{', FlexServe tier ' + a.isa if a.isa else ''}")
    report("prefill", fs_prefill, ll_prefill)
    report("decode", fs_decode, ll_decode)


if __name__ == "__main__":
    main()
