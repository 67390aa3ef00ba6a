#!/usr/bin/env python3
"""llama.cpp on the same GGUF and the same prompt ids as `talaria bench`, for comparison.

    python tools/bench_llamacpp.py MODEL.gguf TALARIA_BENCH.json [--threads N]

Reads the prompt ids and token counts from talaria's bench JSON and prints the same fields.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as llama_c
from llama_cpp import Llama


def cpu_has_amx():
    try:
        return " amx_int8" in open("/proc/cpuinfo").read()
    except OSError:
        return False


# On a CPU with AMX, llama.cpp built natively (as ensure_llama_cpp builds it) repacks the Q4_1
# weights for its AMX backend, and there a prompt's batch crashes the process (SIGSEGV in
# llama_decode, llama-cpp-python 0.3.36, 2-core Xeon VM, 2026-12-04; one token at a time works).
# Without the extra buffer types it runs its AVX-512 / VNNI kernels. Elsewhere the extra buffer
# types (the CPU repack of Q4 blocks) stay on, as they are llama.cpp's fastest path.
EXTRA_BUFFER_TYPES = not cpu_has_amx()
if not EXTRA_BUFFER_TYPES:
    _default_params = llama_c.llama_model_default_params

    def _without_extra_buffer_types():
        params = _default_params()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = _without_extra_buffer_types


def last_argmax(llm):
    # Without logits_all, llama-cpp-python keeps no scores: read the last logits from the context.
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("talaria_json")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ref = json.load(open(args.talaria_json))
    prompt, gen = ref["prompt_ids"], ref["gen_tokens"]
    llm = Llama(model_path=args.model, n_ctx=len(prompt) + gen + 8, n_batch=512,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    runs = []
    for _ in range(len(ref["runs"])):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax(llm)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        ids = [tok]
        for _ in range(gen - 1):
            llm.eval([tok])
            tok = last_argmax(llm)
            ids.append(tok)
        decode_s = time.perf_counter() - t1
        runs.append({"prefill_ms": prefill_ms,
                     "prefill_tok_per_s": len(prompt) / (prefill_ms / 1e3),
                     "decode_tok_per_s": (gen - 1) / decode_s, "ids": ids})
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "model": args.model, "threads": args.threads,
        "extra_buffer_types": EXTRA_BUFFER_TYPES,
        "prompt_tokens": len(prompt), "gen_tokens": gen,
        "median_prefill_tok_per_s": statistics.median(r["prefill_tok_per_s"] for r in runs),
        "median_decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in runs),
        # llama.cpp quantizes activations to 8 bits for its quantized dot products, so its
        # greedy path may part from an f32 engine's after a while.
        "greedy_ids_agreeing_with_talaria": next(
            (i for i, (a, b) in enumerate(zip(runs[0]["ids"], ref.get("ids", []))) if a != b),
            min(len(runs[0]["ids"]), len(ref.get("ids", [])))),
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
