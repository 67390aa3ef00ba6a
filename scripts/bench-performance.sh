#!/usr/bin/env bash
# Every speed number of docs/performance.md's main table in one run, beside llama.cpp on the same
# GGUF, prompt ids and machine: the plain and fixed-point engines, ReMO in process in each
# precision, a local cluster (`talaria up`) in the integer and f64-gemm modes with 0 and 2 dummy
# rows, the pool's hit rate beside each ReMO row, the agent's conversation cache on a chat with a
# long history (`talaria bench-chat`), and the cloud's products (`talaria bench-gemm`).
# Writes $OUT/results.json and $OUT/table.md (default bench-results/performance).
#
# PROMPT_TOKENS (128), GEN_TOKENS (64), RUNS (2), HISTORY_TOKENS (1000); LLAMA=0 skips llama.cpp
# (it is built from source the first time: cmake and a C++ compiler); QUICK=1 is the short pass
# (32/8 tokens, one run, a 200-token history, no llama.cpp). RESUME=1 keeps the results already
# in $OUT and measures only what is missing.
source "$(dirname "$0")/lib.sh"
ensure_rust
ensure_venv
if [ "${QUICK:-0}" = 1 ]; then
  : "${PROMPT_TOKENS:=32}" "${GEN_TOKENS:=8}" "${RUNS:=1}" "${HISTORY_TOKENS:=200}" "${LLAMA:=0}"
fi
PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
GEN_TOKENS="${GEN_TOKENS:-64}"
RUNS="${RUNS:-2}"
HISTORY_TOKENS="${HISTORY_TOKENS:-1000}"
LLAMA="${LLAMA:-1}"
if [ "$LLAMA" = 1 ]; then ensure_llama_cpp; fi
build_release
fetch_model
OUT="${OUT:-bench-results/performance}"
mkdir -p "$OUT"
bench() { # $1: output name, the rest: talaria bench flags
  local name="$1"; shift
  if [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/$name.json" ]; then return; fi
  echo "== $name" >&2
  "$TALARIA" bench "$@" --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" \
    --runs "$RUNS" --out "$OUT/$name.json" > /dev/null
}

bench plain --engine plain
if [ "$LLAMA" = 1 ] && ! { [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/llama-cpp.json" ]; }; then
  echo "== llama.cpp" >&2
  "$VENV/bin/python" tools/bench_llamacpp.py "$MODEL" "$OUT/plain.json" > "$OUT/llama-cpp.json"
fi
bench fixed --engine fixed
bench remo-int-d0 --engine remo --remo-precision int --remo-dummy-rows 0
bench remo-int-d2 --engine remo --remo-precision int --remo-dummy-rows 2
bench remo-f64-gemm-d2 --engine remo --remo-precision f64-gemm --remo-dummy-rows 2
bench remo-f32-d2 --engine remo --remo-precision f32 --remo-dummy-rows 2

# A local cluster (topology/examples/local.toml) with $2's precision and $3 dummy rows.
# A float mode with fewer than 2 dummy rows is below the floor: the agent starts it only when the
# topology says the tenant accepts that, and the tenant's client must accept it too.
cluster() { # $1: output name, $2: precision, $3: dummy rows, $4: chat (also bench-chat) or not
  if [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/$1.json" ]; then return; fi
  local floor="" accept=()
  if [ "$2" != int ] && [ "$3" -lt 2 ]; then
    floor="tenant_accepts_below_floor = true"
    accept=(--accept-below-floor)
  fi
  echo "== cluster $1" >&2
  start_cluster "$TALARIA" "$2" "$3" "$floor"
  "$TALARIA" bench --engine cluster --cluster-dir "$CLUSTER_DIR/run" --allow-insecure-agent "${accept[@]}" \
    --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" --runs "$RUNS" \
    --out "$OUT/$1.json" > /dev/null
  # The agent's counters (its HTTPS API, loopback): where the mask pairs came from.
  curl -sk https://127.0.0.1:8420/metrics > "$OUT/$1.metrics" || true
  if [ "$4" = chat ]; then
    echo "== bench-chat on $1" >&2
    "$TALARIA" bench-chat --cluster-dir "$CLUSTER_DIR/run" --allow-insecure-agent \
      --history-tokens "$HISTORY_TOKENS" --gen-tokens 16 --out "$OUT/chat.json" > /dev/null
  fi
  stop_cluster
}
cluster cluster-int-d0 int 0 chat
cluster cluster-int-d2 int 2 -
cluster cluster-f64-gemm-d2 f64-gemm 2 -
cluster cluster-f64-gemm-d0 f64-gemm 0 -

# The gpu-nodes alone, in the integer mode (the default) and in f32 (whose product costs
# little per row, so it shows what batching gives when the product is not the bound).
for precision in int f32; do
  name=synthetic; [ "$precision" = int ] || name="synthetic-$precision"
  if [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/$name.json" ]; then continue; fi
  echo "== load --synthetic --precision $precision" >&2
  SYNTH_DIR="$(mktemp -d)"
  "$TALARIA" load --synthetic --precision "$precision" --tenants 1,4,16 --rounds "${SYNTH_ROUNDS:-3}" \
    --gen-tokens "${SYNTH_TOKENS:-32}" --run-dir "$SYNTH_DIR" --json "$OUT/$name.json" > /dev/null
  rm -rf "$SYNTH_DIR"
done

echo "== bench-gemm" >&2
"$TALARIA" bench-gemm --rows 3,130 --runs "$RUNS" --out "$OUT/gemm.json" > /dev/null

"$VENV/bin/python" - "$OUT" <<'PY'
import json, os, platform, re, subprocess, sys
out = sys.argv[1]
load = lambda n: json.load(open(f"{out}/{n}.json")) if os.path.exists(f"{out}/{n}.json") else None

def pool_rate(name):
    j = load(name)
    if j and j.get("pool_hit_rate") is not None:
        return j["pool_hit_rate"]
    path = f"{out}/{name}.metrics"
    if not os.path.exists(path):
        return None
    text = open(path).read()
    get = lambda src: float((re.search(r'talaria_agent_mask_pairs_total\{source="%s"\} (\S+)' % src, text) or [0, 0])[1])
    pool, spot = get("pool"), get("on_the_spot")
    return pool / (pool + spot) if pool + spot else None

rows = [
    ("llama.cpp (llama-cpp-python, same GGUF)", "llama-cpp"),
    ("plain", "plain"),
    ("fixed (the integer mode's reference)", "fixed"),
    ("remo int, 0 dummy rows (the default)", "remo-int-d0"),
    ("remo int, 2 dummy rows", "remo-int-d2"),
    ("remo f64-gemm, 2 dummy rows", "remo-f64-gemm-d2"),
    ("remo f32, 2 dummy rows", "remo-f32-d2"),
    ("cluster int, 0 dummy rows (the default)", "cluster-int-d0"),
    ("cluster int, 2 dummy rows", "cluster-int-d2"),
    ("cluster f64-gemm, 2 dummy rows", "cluster-f64-gemm-d2"),
    ("cluster f64-gemm, 0 dummy rows", "cluster-f64-gemm-d0"),
]
plain = load("plain")
cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
model_name = (re.search(r"model name\s*:\s*(.*)", cpuinfo) or [None, platform.machine()])[1]
flags = set((re.search(r"flags\s*:\s*(.*)", cpuinfo) or [None, ""])[1].split())
result = {"machine": {"cpu": model_name, "cores": os.cpu_count(),
                      "vector": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"},
          "engines": [], "chat": load("chat"), "gemm": None,
          "synthetic": load("synthetic"),
          "synthetic_f32": load("synthetic-f32")}
try:
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
for label, name in rows:
    j = load(name)
    if j is None:
        continue
    same = None
    if plain and name not in ("plain", "llama-cpp") and j.get("ids"):
        same = j["ids"] == plain["ids"]
    result["engines"].append({
        "engine": label, "name": name,
        "prefill_tok_per_s": j["median_prefill_tok_per_s"],
        "decode_tok_per_s": j["median_decode_tok_per_s"],
        "pool_hit_rate": pool_rate(name),
        "greedy_ids_equal_plain": same,
    })
g = load("gemm")
if g:
    result["gemm"] = [{"rows": p["rows"], "f32_ms": p["total_f32_ms"], "f64_ms": p["total_f64_ms"],
                       "u64_ms": p["total_u64_ms"], "u64_over_f32": p["u64_over_f32"],
                       "u64_by_kernel_ms": p.get("u64_by_kernel_ms", {}),
                       "u64_fraction_of_peak": p.get("u64_fraction_of_peak"),
                       "u64_kernel": p.get("u64_kernel")} for p in g["passes"]]
    result["u64_kernel"] = g["u64_kernel"]
    result["pair_dot_peak_per_thread"] = g.get("pair_dot_peak_per_thread", {})
    result["amx_int8_peak_per_thread"] = g.get("amx_int8_peak_per_thread")
json.dump(result, open(f"{out}/results.json", "w"), indent=2)

md = []
m = result["machine"]
md.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['vector']}; commit {result.get('commit', '?')}.")
md.append("")
md.append(f"| engine | prefill tok/s | decode tok/s | decode vs plain | pool hit rate | greedy ids = plain |")
md.append("|---|---|---|---|---|---|")
base = plain["median_decode_tok_per_s"] if plain else None
for e in result["engines"]:
    rate = "" if e["pool_hit_rate"] is None else f"{100 * e['pool_hit_rate']:.0f} %"
    same = {None: "", True: "yes", False: "**no**"}[e["greedy_ids_equal_plain"]]
    ratio = f"{e['decode_tok_per_s'] / base:.2f}×" if base else ""
    md.append(f"| {e['engine']} | {e['prefill_tok_per_s']:.1f} | {e['decode_tok_per_s']:.2f} | {ratio} | {rate} | {same} |")
c = result["chat"]
if c:
    md.append("")
    md.append("| conversation cache (cluster int) | prompt tokens | cached | TTFT s (client) | agent prefill s | calls |")
    md.append("|---|---|---|---|---|---|")
    for k, label in [("first", "first turn"), ("second_warm", "next turn, cached"), ("second_cold", "next turn, cold")]:
        t = c[k]
        md.append(f"| {label} | {t['prompt_tokens']} | {t['cached_tokens']} | {t['ttft_s']:.2f} | {t['agent_prefill_s']:.2f} | {t['calls']} |")
    md.append("")
    md.append(f"Next turn's TTFT over the first turn's: **{c['warm_over_first_ttft']:.3f}**; "
              f"cached over cold: {c['warm_over_cold_ttft']:.3f}; same answer: {c['same_answer']}.")
if result["synthetic"] or result["synthetic_f32"]:
    md.append("")
    md.append("| gpu-nodes alone (`load --synthetic`) | steps/s, median (range) | × one session (medians; each round) | calls per frame (stage 0, 1), mean of the steps | calls per GEMM (stage 0, 1), mean of the steps | ms compute per GEMM (stage 0, 1), mean | stage CPU ms / step, mean | datagrams lost |")
    md.append("|---|---|---|---|---|---|---|---|")
    mean = lambda v: sum(v) / len(v)
    for mode, report in (("int", result["synthetic"]), ("f32", result["synthetic_f32"])):
        if not report:
            continue
        steps = report.get("synthetic", [])
        # Reports written before `--rounds` have one step per count and no medians.
        medians = report.get("synthetic_medians") or [
            {"sessions": s["sessions"], "steps": 1, "tokens_per_s": s["tokens_per_s"],
             "min_tokens_per_s": s["tokens_per_s"], "max_tokens_per_s": s["tokens_per_s"],
             "speedup_vs_one_session": s["speedup_vs_one_session"], "speedups_by_round": []}
            for s in steps]
        # A link's losses count from the connection's start (before the first step): each
        # step's own are the difference from the step before.
        link_lost = [sum(l["lost_packets"] for l in s.get("links", [])) for s in steps]
        step_lost = [b - a for a, b in zip([0] + link_lost, link_lost)]
        for s, lost in zip(steps, step_lost):
            s["lost_here"] = lost + s.get("answer_datagrams_lost", 0)
        for m in medians:
            mine = [s for s in steps if s["sessions"] == m["sessions"]]
            stages = range(len(mine[0]["batches"]))
            per = " / ".join(f"{mean([s['batches'][i]['calls_per_batch']['mean'] for s in mine]):.1f}" for i in stages)
            frames = " / ".join(f"{mean([s['batches'][i]['calls_per_frame']['mean'] for s in mine]):.1f}" for i in stages)
            gemm = " / ".join(f"{1e3 * mean([s['batches'][i]['compute_seconds_per_batch']['mean'] for s in mine]):.2f}" for i in stages)
            cpu = mean([sum(v for k, v in s["cpu_ms_per_token"].items() if k.startswith("stage-")) for s in mine])
            x = "" if m["speedup_vs_one_session"] is None else f"{m['speedup_vs_one_session']:.2f}"
            if m["speedups_by_round"]:
                x += " (" + ", ".join(f"{r:.2f}" for r in m["speedups_by_round"]) + ")"
            lost = sum(s["lost_here"] for s in mine)
            rate = f"{m['tokens_per_s']:.2f}"
            if m["steps"] > 1:
                rate += f" ({m['min_tokens_per_s']:.2f}–{m['max_tokens_per_s']:.2f})"
            md.append(f"| {mode}, {m['sessions']} session(s), {m['steps']} step(s) | {rate} | {x} | {frames} | {per} | {gemm} | {cpu:.0f} | {lost} |")
if result["gemm"]:
    md.append("")
    kernels = sorted({k for p in result["gemm"] for k in p["u64_by_kernel_ms"]})
    md.append(f"| cloud products, one pass (`bench-gemm`) | f32 ms | f64 ms | u64 ms | u64 kernel | u64 / f32 | u64 of its peak | "
              + "".join(f"u64 on {k} ms | " for k in kernels))
    md.append("|---|---|---|---|---|---|---|" + "---|" * len(kernels))
    for p in result["gemm"]:
        peak = "" if p["u64_fraction_of_peak"] is None else f"{100 * p['u64_fraction_of_peak']:.0f} %"
        md.append(f"| {p['rows']} rows | {p['f32_ms']:.1f} | {p['f64_ms']:.1f} | {p['u64_ms']:.1f} | {p.get('u64_kernel') or result['u64_kernel']} | {p['u64_over_f32']:.2f} | {peak} | "
                  + "".join(f"{p['u64_by_kernel_ms'].get(k, float('nan')):.1f} | " for k in kernels))
    if result["pair_dot_peak_per_thread"]:
        md.append("")
        md.append("Measured peak of the pair dot, per thread (16-bit multiply-adds/s): "
                  + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in sorted(result["pair_dot_peak_per_thread"].items())) + ".")
    if result.get("amx_int8_peak_per_thread"):
        md.append(f"Measured peak of AMX's tile product, per thread (8-bit multiply-adds/s): {result['amx_int8_peak_per_thread'] / 1e9:.0f} G.")
open(f"{out}/table.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
