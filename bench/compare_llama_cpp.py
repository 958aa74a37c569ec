#!/usr/bin/env python3
"""Prefill and decode speed of FlexServe against llama.cpp on the same GGUF file,
measured alternately in one run and reported as ratios (FlexServe / llama.cpp).

Needs `pip install llama-cpp-python` (compiles llama.cpp from source: minutes) and
a release build of flexserve (`cargo build --release`). Not part of the tests.

  python3 bench/compare_llama_cpp.py --model M.gguf [--prompt-tokens 128,512]
      [--gen-tokens 32] [--threads 2] [--repetitions 5] [--no-flash-attn]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def prompt_ids(n, n_vocab):
    # The same deterministic ids as `flexserve bench engine`.
    return [(i * 7919 + 13) % n_vocab for i in range(n)]


class LlamaCpp:
    def __init__(self, model, max_prompt, gen, threads, flash_attn):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model,
            n_ctx=max_prompt + gen + 16,
            n_batch=max_prompt,
            n_ubatch=max_prompt,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=flash_attn,
            # The binding's quiet mode crashes on some builds (0.3.36 built
            # without AMX); its log goes to stderr instead.
            verbose=True,
        )
        self.n_vocab = self.llm.n_vocab()
        self.prefill(16)
        self.decode(4)

    def prefill(self, n):
        self.llm.reset()
        ids = prompt_ids(n, self.n_vocab)
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return n / (time.perf_counter() - t0)

    def decode(self, n):
        self.llm.reset()
        self.llm.eval([1])
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            self.llm.eval([nxt])
        return n / (time.perf_counter() - t0)


def flexserve_once(binary, model, prompts, gen, threads):
    out = subprocess.run(
        [binary, "bench", "engine", "--model", model, "--prompt-tokens", ",".join(map(str, prompts)),
         "--gen-tokens", str(gen), "--threads", str(threads), "--repetitions", "1", "--json"],
        check=True, capture_output=True, text=True,
    )
    r = json.loads(out.stdout)
    pp = {p["n_tokens"]: p["tokens_per_s"][0] for p in r["prefill"]}
    return pp, r["decode"]["tokens_per_s"][0], r["peak_rss_bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", default="128,512")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--no-flash-attn", action="store_true", help="llama.cpp without flash attention")
    ap.add_argument("--flexserve", default=str(Path(__file__).resolve().parent.parent / "target/release/flexserve"))
    a = ap.parse_args()
    prompts = [int(x) for x in a.prompt_tokens.split(",")]

    peer = LlamaCpp(a.model, max(prompts), a.gen_tokens, a.threads, not a.no_flash_attn)
    fs = {("pp", n): [] for n in prompts}
    ll = {("pp", n): [] for n in prompts}
    fs[("tg", a.gen_tokens)] = []
    ll[("tg", a.gen_tokens)] = []
    rss = 0
    for rep in range(a.repetitions):
        # Alternate which engine goes first so that drift hits both alike.
        order = ["fs", "ll"] if rep % 2 == 0 else ["ll", "fs"]
        for who in order:
            if who == "fs":
                pp, tg, rss = flexserve_once(a.flexserve, a.model, prompts, a.gen_tokens, a.threads)
                for n in prompts:
                    fs[("pp", n)].append(pp[n])
                fs[("tg", a.gen_tokens)].append(tg)
            else:
                for n in prompts:
                    ll[("pp", n)].append(peer.prefill(n))
                ll[("tg", a.gen_tokens)].append(peer.decode(a.gen_tokens))
        print(f"repetition {rep + 1}/{a.repetitions} done", file=sys.stderr)

    print(f"model: {a.model}  threads: {a.threads}  repetitions: {a.repetitions}  "
          f"llama.cpp flash attention: {'off' if a.no_flash_attn else 'on'}")
    print(f"{'test':<8} {'flexserve t/s':>14} {'llama.cpp t/s':>14} {'ratio':>7}")
    result = {"model": a.model, "threads": a.threads, "tests": []}
    for key in fs:
        f = statistics.median(fs[key])
        l = statistics.median(ll[key])
        name = f"{key[0]}{key[1]}"
        print(f"{name:<8} {f:>14.1f} {l:>14.1f} {f / l:>7.2f}")
        result["tests"].append({"test": name, "flexserve": fs[key], "llama_cpp": ll[key], "ratio_of_medians": f / l})
    print(f"flexserve peak RSS: {rss / 2**20:.1f} MiB")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
