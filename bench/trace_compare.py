#!/usr/bin/env python3
"""Finds the first operation where FlexServe's forward pass parts from llama.cpp's:
llama.cpp's intermediate tensors, read through its evaluation callback
(llama-cpp-python's low-level API), against the engine's own, written by the
`trace_forward` example under the same names, for one batch of token ids.

  cargo build --release -p flexserve-engine --example trace_forward
  python3 bench/trace_compare.py --model M.gguf --ids 1,504,3575 2>/dev/null

Prints, per tensor in graph order, the largest difference and how many values
differ at all; the first line with differing values is the operation to read.
"""
import argparse
import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np


class GgmlTensor(ctypes.Structure):
    pass


# ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64).
GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10), ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def tensor_array(t):
    """An f32 or f16 tensor (any strides) as a float32 array, or None."""
    dtype = {0: np.float32, 1: np.float16}.get(t.type)
    if dtype is None:
        return None
    ne, nb, item = list(t.ne), list(t.nb), np.dtype(dtype).itemsize
    size = sum((ne[i] - 1) * nb[i] for i in range(4)) + item
    flat = np.frombuffer((ctypes.c_char * size).from_address(t.data), dtype=dtype, count=size // item)
    return np.array(np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]), dtype=np.float32)


def llama_cpp_trace(model, ids, threads):
    """llama.cpp's tensors of one batch, the last one of each name (after rotation for Qcur/Kcur)."""
    import llama_cpp as L

    captured = {}

    def callback(ptr, ask, _):
        t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
        if ask:
            return True
        a = tensor_array(t)
        if a is not None:
            captured[t.name.decode(errors="replace")] = a
        return True

    cb = L.ggml_backend_sched_eval_callback(callback)
    m = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = max(64, len(ids) + 16)
    cp.n_batch = cp.n_ubatch = max(64, len(ids))
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = 1  # on, llama.cpp's default on the CPU
    cp.cb_eval = cb
    ctx = L.llama_init_from_model(m, cp)
    arr = (L.llama_token * len(ids))(*ids)
    assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) == 0
    return captured


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated token ids (fewer than 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", default=str(Path(__file__).resolve().parent.parent / "target/release/examples/trace_forward"))
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",")]
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([a.trace, a.model, a.ids, out], capture_output=True, text=True, check=True)
        print(run.stderr.strip().splitlines()[-1])
        ours = {}
        for line in open(os.path.join(out, "index.txt")):
            name, row = line.split()
            ours[name] = np.fromfile(os.path.join(out, name + ".f32"), dtype=np.float32).reshape(-1, int(row))
    theirs = llama_cpp_trace(a.model, ids, a.threads)
    for name, x in ours.items():
        if name not in theirs:
            continue
        y = theirs[name].reshape(-1, x.shape[1])[-x.shape[0]:]
        d = np.abs(x - y)
        print(f"{name:<16} max |diff| {d.max():.3e}  differing {int((x != y).sum())}/{x.size}")


if __name__ == "__main__":
    main()
