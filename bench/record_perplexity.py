#!/usr/bin/env python3
"""Records llama.cpp's perplexity of a text, computed as llama-perplexity does, for
the engine's reference tests (crates/flexserve-engine/tests/reference/perplexity-*.json).

The text is tokenized with the model's special tokens added (BOS) and cut into
consecutive chunks of --ctx tokens; each chunk is evaluated from an empty cache,
its first token replaced by BOS where the model adds one, and the second half of
each chunk is scored. llama.cpp runs through llama-cpp-python with flash attention
on (its default); see bench/record_reference.py for how to build the binding.

  python3 bench/record_perplexity.py --model M.gguf --text FILE --ctx 1024 --out perplexity-NAME.json
"""
import argparse
import json
import math
import os

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    # verbose=True: this binding's quiet mode crashes on some builds; its log goes to stderr.
    llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_ubatch=min(a.ctx, 512), n_threads=a.threads,
                n_threads_batch=a.threads, flash_attn=True, logits_all=True, verbose=True)
    text = open(a.text, encoding="utf-8").read()
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    bos = llm.token_bos()
    n_chunks = len(tokens) // a.ctx
    first = a.ctx // 2
    nll = nll2 = 0.0
    count = 0
    running = []
    for c in range(n_chunks):
        chunk = tokens[c * a.ctx:(c + 1) * a.ctx]
        inp = ([bos] + chunk[1:]) if add_bos else chunk
        llm.reset()
        llm.eval(inp)
        logits = np.array(llm.scores[:a.ctx], dtype=np.float64)
        for j in range(first, a.ctx - 1):
            row = logits[j]
            m = row.max()
            logprob = row[chunk[j + 1]] - m - math.log(np.exp(row - m).sum())
            nll -= logprob
            nll2 += logprob * logprob
            count += 1
        running.append(round(math.exp(nll / count), 4))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    record = {
        "model": os.path.basename(a.model),
        "text_file": a.text,
        "ctx": a.ctx,
        "n_tokens": len(tokens),
        "n_chunks": n_chunks,
        "ppl": round(ppl, 4),
        "ppl_plus_minus": round(ppl * math.sqrt(max(var, 0.0) / max(count - 1, 1)), 5),
        "running_ppl": running,
        "source": f"llama.cpp from llama-cpp-python {llama_cpp.__version__}, flash attention on; "
                  "bench/record_perplexity.py (llama-perplexity's chunks and scoring)",
    }
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
