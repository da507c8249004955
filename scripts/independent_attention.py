#!/usr/bin/env python3
"""An independent implementation of Spotlight's attention semantics in NumPy (float64).

It shares no code with the Rust reference: it is written from the README's semantics, vectorised
over whole score matrices, and reads/writes safetensors with its own tiny parser. The CLI tests
compare `spotlight run` with it.

usage: independent_attention.py IN.safetensors OUT.safetensors [--causal] [--window L,R]
       [--scale S] [--softcap C] [--layout bshd|bhsd] [--prefix P]
Writes `out` (float32) and `lse` (float32, -inf for empty rows).
"""
import argparse
import json
import struct

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


def bf16_to_f32(raw):
    u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return u.view(np.float32)


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = body[a:b]
        if meta["dtype"] == "BF16":
            arr = bf16_to_f32(raw)
        else:
            arr = np.frombuffer(raw, dtype=DT[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"])
    return out


def save(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--window")
    ap.add_argument("--scale", type=float)
    ap.add_argument("--softcap", type=float)
    ap.add_argument("--layout", default="bshd")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--algorithm")  # accepted and ignored: there is one algorithm here
    a = ap.parse_args()
    t = load(a.input)
    g = lambda n: t.get(a.prefix + n)
    q, k, v = (g(n).astype(np.float64) for n in "qkv")
    if a.layout == "bshd":  # to [B, H, L, D]
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scale = a.scale if a.scale is not None else 1.0 / np.sqrt(D)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if a.softcap:
        s = a.softcap * np.tanh(s / a.softcap)
    if g("bias") is not None:
        bias = g("bias").astype(np.float64)
        s = s + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    qlen = g("q_seqlens") if g("q_seqlens") is not None else np.full(B, Lq)
    klen = g("kv_seqlens") if g("kv_seqlens") is not None else np.full(B, Lk)
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    visible = np.ones((B, Hq, Lq, Lk), dtype=bool)
    for b in range(B):
        off = int(klen[b]) - int(qlen[b])
        vis = (j < klen[b]) & (i < qlen[b])
        if a.causal:
            vis &= j <= i + off
        if a.window:
            left, right = (int(x) for x in a.window.split(","))
            if left >= 0:
                vis &= j >= i + off - left
            if right >= 0:
                vis &= j <= i + off + right
        visible[b] &= vis
        if g("alibi_slopes") is not None:
            slopes = g("alibi_slopes").astype(np.float64)
            s[b] -= slopes[:, None, None] * np.abs(i + off - j)[None]
    if g("mask") is not None:
        m = g("mask").astype(bool)
        visible &= m.reshape((1,) * (4 - m.ndim) + m.shape)
    s = np.where(visible, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(mx)
    mx = np.where(empty, 0.0, mx)
    e = np.where(visible, np.exp(s - mx), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
    o = np.einsum("bhij,bhjd->bhid", p, v)
    with np.errstate(divide="ignore"):
        lse = np.where(den[..., 0] > 0, (mx + np.log(den))[..., 0], -np.inf)
    if a.layout == "bshd":
        o = o.transpose(0, 2, 1, 3)
    save(a.output, {"out": o, "lse": lse})


if __name__ == "__main__":
    main()
