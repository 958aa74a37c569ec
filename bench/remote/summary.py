#!/usr/bin/env python3
"""Medians and ratios from an unpacked results.tgz of bench/remote/run.sh.

    python3 summary.py RESULTS_DIR
"""
import json
import pathlib
import statistics
import sys


def flexserve(path):
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    r = {f"pp{s['n_tokens']}": statistics.median(s["tokens_per_s"]) for s in v["prefill"]}
    r[f"tg{v['decode']['n_tokens']}"] = statistics.median(v["decode"]["tokens_per_s"])
    return r


def llama(path):
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {(f"pp{e['n_prompt']}" if e["n_prompt"] else f"tg{e['n_gen']}"): statistics.median(e["samples_ts"]) for e in v}


d = pathlib.Path(sys.argv[1])
print(f"{'model':<14} {'test':<6} {'FlexServe':>10} {'llama.cpp':>10} {'ratio':>6} {'AVX2 tier':>10} {'tier gain':>9}")
for f in sorted(d.glob("fs-*.json")):
    if f.name.startswith("fs-avx2-"):
        continue
    name = f.name[3:-5]
    fs, ll, avx2 = flexserve(f), llama(d / f"llama-{name}.json"), flexserve(d / f"fs-avx2-{name}.json")
    for test in fs or {}:
        ref = (ll or {}).get(test)
        low = (avx2 or {}).get(test)
        ratio = f"{fs[test] / ref:6.2f}" if ref else "     -"
        gain = f"{fs[test] / low:9.2f}" if low else "        -"
        print(f"{name:<14} {test:<6} {fs[test]:10.1f} {ref or 0:10.1f} {ratio} {low or 0:10.1f} {gain}")
