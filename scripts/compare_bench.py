#!/usr/bin/env python3
"""Side-by-side table of `spotlight bench` and `torch_sdpa.py` lines from the same device call.

usage: compare_bench.py SPOTLIGHT.log TORCH.log
Matches configurations on (B, Hq, Lq, Lk, D, causal) and prints TFLOP/s with the ratio of ours to
PyTorch's flash (f16) and memory-efficient (f32) backends.
"""
import sys


def parse(path, tag):
    rows = []
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) < 3 or parts[0] != tag or "=" not in parts[2]:
            continue
        kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        kv["name"] = parts[1]
        rows.append(kv)
    return rows


def key(r):
    return tuple(r.get(k) for k in ("B", "Hq", "Lq", "Lk", "D", "causal"))


def main():
    ours = parse(sys.argv[1], "spotlight")
    peers = parse(sys.argv[2], "peer")
    by = {}
    for p in peers:
        by.setdefault(key(p), {})[p["name"]] = p
    print(f"{'B':>3} {'Hq':>3} {'L':>6} {'D':>4} {'c':>2} {'ours':>10} {'dtype':>5} {'TFLOP/s':>9} "
          f"{'flash16':>9} {'ratio':>6} {'eff32':>9} {'ratio':>6}")
    for r in ours:
        if "tflops" not in r:
            # Lines without a FLOP rate (the decode stream-read yardstick, notes) are not rows.
            continue
        peer = by.get(key(r), {})
        t = float(r["tflops"])
        cols = []
        for name in ("sdpa-flash", "sdpa-efficient"):
            p = peer.get(name)
            if p and "tflops" in p:
                pt = float(p["tflops"])
                cols += [f"{pt:9.2f}", f"{t / pt:6.3f}"]
            else:
                cols += [f"{'-':>9}", f"{'-':>6}"]
        print(f"{r['B']:>3} {r['Hq']:>3} {r['Lq']:>6} {r['D']:>4} {r['causal']:>2} {r['name']:>10} "
              f"{r['dtype']:>5} {t:9.3f} " + " ".join(cols))


if __name__ == "__main__":
    main()
