#!/usr/bin/env python3
"""Independent reference forward pass for `llama` GGUF models, in float64 numpy.

Written from the architecture's definition, sharing no code with the Rust engine: it dequantizes
with the `gguf` package, applies the norm gains where the model defines them (no folding), and
decodes greedily with a KV cache.

    python tools/reference.py MODEL.gguf tests/golden/prompts.json --out tests/golden/greedy.json
    python tools/reference.py MODEL.gguf tests/golden/prompts.json --check tests/golden/greedy.json

prompts.json: {"prompts": [{"name": ..., "prompt_ids": [...], "max_tokens": N}, ...]}.
The output lists the greedy ids and, per step, the gap between the top two logits (a small gap is
a near-tie that float rounding may flip).
"""
import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    return reader.fields[key].contents()


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        arch = field(r, "general.architecture")
        assert arch == "llama", arch
        self.n_layers = field(r, "llama.block_count")
        self.d = field(r, "llama.embedding_length")
        self.n_heads = field(r, "llama.attention.head_count")
        self.n_kv = field(r, "llama.attention.head_count_kv")
        self.hd = self.d // self.n_heads
        self.eps = field(r, "llama.attention.layer_norm_rms_epsilon")
        self.base = field(r, "llama.rope.freq_base")
        self.eos = field(r, "tokenizer.ggml.eos_token_id")
        t = {}
        for tensor in r.tensors:
            # numpy shape is GGUF's dims reversed: (out, in) for a projection.
            w = dequantize(tensor.data, tensor.tensor_type)
            shape = tuple(int(x) for x in reversed(tensor.shape))
            t[tensor.name] = np.asarray(w, dtype=np.float64).reshape(shape)
        self.t = t
        self.out = t.get("output.weight", t["token_embd.weight"])

    def rmsnorm(self, x, gain):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * gain

    def rope(self, x, pos):
        # x: (heads, hd); rotate adjacent pairs (x[2i], x[2i+1]).
        i = np.arange(self.hd // 2)
        theta = pos * self.base ** (-2.0 * i / self.hd)
        cos, sin = np.cos(theta), np.sin(theta)
        a, b = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2] = a * cos - b * sin
        out[:, 1::2] = a * sin + b * cos
        return out

    def step(self, token, pos, cache):
        t = self.t
        h = t["token_embd.weight"][token].copy()
        group = self.n_heads // self.n_kv
        for l in range(self.n_layers):
            p = f"blk.{l}."
            x = self.rmsnorm(h, t[p + "attn_norm.weight"])
            q = (t[p + "attn_q.weight"] @ x).reshape(self.n_heads, self.hd)
            k = (t[p + "attn_k.weight"] @ x).reshape(self.n_kv, self.hd)
            v = (t[p + "attn_v.weight"] @ x).reshape(self.n_kv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            cache[l][0].append(k)
            cache[l][1].append(v)
            K = np.stack(cache[l][0])  # (T, n_kv, hd)
            V = np.stack(cache[l][1])
            att = np.empty((self.n_heads, self.hd))
            for hh in range(self.n_heads):
                g = hh // group
                s = K[:, g, :] @ q[hh] / np.sqrt(self.hd)
                s = np.exp(s - s.max())
                att[hh] = (s / s.sum()) @ V[:, g, :]
            h = h + t[p + "attn_output.weight"] @ att.reshape(-1)
            x = self.rmsnorm(h, t[p + "ffn_norm.weight"])
            gate = t[p + "ffn_gate.weight"] @ x
            up = t[p + "ffn_up.weight"] @ x
            h = h + t[p + "ffn_down.weight"] @ (gate / (1.0 + np.exp(-gate)) * up)
        x = self.rmsnorm(h, t["output_norm.weight"])
        return self.out @ x

    def greedy(self, prompt_ids, max_tokens):
        cache = [([], []) for _ in range(self.n_layers)]
        logits = None
        for pos, tok in enumerate(prompt_ids):
            logits = self.step(tok, pos, cache)
        ids, gaps = [], []
        pos = len(prompt_ids)
        while len(ids) < max_tokens:
            top2 = np.argsort(logits)[-2:]
            nxt = int(np.argmax(logits))
            gaps.append(float(logits[top2[1]] - logits[top2[0]]))
            ids.append(nxt)
            if nxt == self.eos:
                break
            logits = self.step(nxt, pos, cache)
            pos += 1
        return ids, gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("prompts")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the reference output here")
    g.add_argument("--check", help="fail unless the reference output equals this file's ids")
    args = ap.parse_args()

    model = Model(args.model)
    prompts = json.load(open(args.prompts))["prompts"]
    results = []
    for p in prompts:
        ids, gaps = model.greedy(p["prompt_ids"], p["max_tokens"])
        results.append({"name": p["name"], "prompt_ids": p["prompt_ids"], "ids": ids,
                        "min_top2_gap": min(gaps), "top2_gaps": [round(x, 6) for x in gaps]})
        print(f"{p['name']}: {len(ids)} tokens, smallest top-2 gap {min(gaps):.4f}", file=sys.stderr)
    doc = {"generator": "tools/reference.py (float64 numpy, gguf dequantizers)", "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        return 0
    expected = {r["name"]: r["ids"] for r in json.load(open(args.check))["results"]}
    bad = [r["name"] for r in results if expected.get(r["name"]) != r["ids"]]
    if bad or len(expected) != len(results):
        print(f"reference disagrees with {args.check}: {bad}", file=sys.stderr)
        return 1
    print(f"reference agrees with {args.check} on {len(results)} prompts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
