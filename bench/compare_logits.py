#!/usr/bin/env python3
"""Logits of FlexServe against llama.cpp (llama-cpp-python, default settings: weight
repacking on, flash attention on unless --no-flash-attn) on the same GGUF file: a
prompt evaluated as one batch (every position) and single-token decode steps.

Needs the `dump_logits` example built in release mode:
  cargo build --release -p flexserve-engine --example dump_logits
  python3 bench/compare_logits.py --model M.gguf [--dump target/release/examples/dump_logits]
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
    ap.add_argument("--dump", default=str(Path(__file__).resolve().parent.parent / "target/release/examples/dump_logits"))
    a = ap.parse_args()

    from llama_cpp import Llama

    llm = Llama(model_path=a.model, n_ctx=a.prompt_tokens + a.decode_tokens + 16, n_batch=a.prompt_tokens,
                n_ubatch=a.prompt_tokens, n_threads=a.threads, n_threads_batch=a.threads,
                flash_attn=not a.no_flash_attn, logits_all=True, verbose=False)
    n_vocab = llm.n_vocab()
    # Deterministic ids (as bench/compare_llama_cpp.py), decode ids continuing the sequence.
    ids = [(i * 7919 + 13) % n_vocab for i in range(a.prompt_tokens + a.decode_tokens)]
    prompt, decode = ids[:a.prompt_tokens], ids[a.prompt_tokens:]
    llm.reset()
    llm.eval(prompt)
    ll_prefill = np.array(llm.scores[:a.prompt_tokens], dtype=np.float32)
    ll_decode = []
    for t in decode:
        llm.eval([t])
        ll_decode.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    ll_decode = np.array(ll_decode)

    out = subprocess.run([a.dump, a.model, ",".join(map(str, prompt)), ",".join(map(str, decode)), str(a.threads)],
                         check=True, capture_output=True, text=True)
    fs = json.loads(out.stdout)
    fs_prefill = np.array(fs["prefill"], dtype=np.float32)
    fs_decode = np.array(fs["decode"], dtype=np.float32)

    def report(name, x, y):
        d = np.abs(x - y)
        print(f"{name:<8} max |diff| {d.max():.3e}  mean |diff| {d.mean():.3e}  max |logit| {np.abs(y).max():.2f}  "
              f"argmax agree {int((x.argmax(-1) == y.argmax(-1)).sum())}/{len(x)}")

    print(f"model: {a.model}  prompt {a.prompt_tokens} tokens, {a.decode_tokens} decode steps, "
          f"llama.cpp flash attention {'off' if a.no_flash_attn else 'on'}")
    report("prefill", fs_prefill, ll_prefill)
    report("decode", fs_decode, ll_decode)


if __name__ == "__main__":
    main()
