"""CPU decode, stowage-generate vs Transformers generate, side by side in one run on one machine.

    /opt/stowage-tools-venv/bin/python bench/decode_side_by_side.py \
        --generate build-gen/examples/generate/stowage-generate

Same model as bench/offload_side_by_side.py (/tmp/stowage-offload-bench, ~870 MB float32 Llama,
made once with transformers, never committed), everything in host memory, greedy, 2 threads on
both sides, fp32 and bf16 weights:
  - stowage: stowage-generate --device-map {"": "cpu"} --dtype float32|bfloat16 --threads 2
    (decode tokens/s as it prints it: new tokens after the first / time after the prefill);
  - Transformers: model.generate(min_new_tokens = max_new_tokens = N, do_sample=False) with
    torch.set_num_threads(2), the model in float32 or .to(torch.bfloat16); decode tokens/s
    = (N - 1) / (total - time of a 1-token generate).
The memory-bandwidth bound is bytes of weights read per token / measured bandwidth, the
bandwidth measured here by torch summing a 1 GiB float32 tensor on 2 threads (best of 5),
before the runs and after each dtype's runs, the best of those kept.
Each side runs --repeat times (default 3), best kept, all in the JSON.
Targets: stowage >= 2x Transformers and >= 50% of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

MODEL = "/tmp/stowage-offload-bench"
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
NEW = 32


def run_stowage(generate: str, dtype: str, tmp: str) -> dict:
    map_path = os.path.join(tmp, "all_cpu.json")
    with open(map_path, "w") as f:
        f.write('{"": "cpu"}')
    cmd = [generate, MODEL, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW),
           "--device-map", map_path, "--dtype", dtype, "--threads", "2", "--ignore-eos"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"decode\s+(\d+) tokens in ([0-9.]+) s \(([0-9.]+) tokens/s\)", out)
    return {"tokens_per_s": float(m.group(3))}


def run_transformers(dtype: str) -> dict:
    code = f"""
import json, time, torch, transformers
torch.set_num_threads(2)
dt = torch.{ 'float32' if dtype == 'float32' else 'bfloat16' }
model = transformers.LlamaForCausalLM.from_pretrained({MODEL!r}, dtype=dt)
model.eval()
ids = torch.tensor([{PROMPT!r}])
def gen(n):
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0
gen(2)  # warm-up
first = min(gen(1) for _ in range(2))
total = gen({NEW})
print(json.dumps({{"tokens_per_s": ({NEW} - 1) / (total - first), "first_s": first,
                  "total_s": total}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def bandwidth() -> float:
    code = """
import time, torch
torch.set_num_threads(2)
t = torch.ones(256 << 20, dtype=torch.float32)
best = 1e9
for _ in range(5):
    t0 = time.perf_counter(); t.sum().item(); best = min(best, time.perf_counter() - t0)
print(t.numel() * 4 / best)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    return float(out.strip().splitlines()[-1])


def weight_bytes_per_token(elem: int) -> int:
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    # Every layer, the final norm and lm_head are read each token; of the embeddings one row.
    return elem * (L * per_layer + h + v * h + h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate", required=True)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each side; the best tokens/s is kept (the machine is shared)")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
        sys.exit("run bench/offload_side_by_side.py first (it makes " + MODEL + ")")
    load_before = os.getloadavg()
    bw_runs = [bandwidth()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="stowage-decode-bench-") as tmp:
        for dtype, elem in (("float32", 4), ("bfloat16", 2)):
            sts = [run_stowage(args.generate, dtype, tmp) for _ in range(args.repeat)]
            st = max(sts, key=lambda r: r["tokens_per_s"])
            tfs = [run_transformers(dtype) for _ in range(args.repeat)]
            tf = max(tfs, key=lambda r: r["tokens_per_s"])
            bw_runs.append(bandwidth())
            rows.append({"dtype": dtype, "elem": elem, "stowage_tok_s": st["tokens_per_s"],
                         "transformers_tok_s": tf["tokens_per_s"],
                         "speedup": st["tokens_per_s"] / tf["tokens_per_s"],
                         "all_stowage_tok_s": [r["tokens_per_s"] for r in sts],
                         "all_transformers_tok_s": [r["tokens_per_s"] for r in tfs],
                         "transformers_runs": tfs})
    # The bandwidth is measured before and after each dtype's runs and the best kept: on a shared
    # machine a single measurement under contention understates it (and overstates the fraction).
    bw = max(bw_runs)
    for r in rows:
        r["bandwidth_bound_tok_s"] = bw / weight_bytes_per_token(r["elem"])
        r["fraction_of_bound"] = r["stowage_tok_s"] / r["bandwidth_bound_tok_s"]
        r["median_stowage_tok_s"] = sorted(r["all_stowage_tok_s"])[len(r["all_stowage_tok_s"]) // 2]
        r["median_transformers_tok_s"] = sorted(r["all_transformers_tok_s"])[
            len(r["all_transformers_tok_s"]) // 2]
    print("| weights | stowage tok/s | Transformers tok/s | speedup | bandwidth bound tok/s | "
          "stowage / bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['dtype']} | {r['stowage_tok_s']:.2f} | {r['transformers_tok_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['bandwidth_bound_tok_s']:.2f} | "
              f"{100 * r['fraction_of_bound']:.0f}% |")
    print(json.dumps({"bandwidth_GBps": bw / 1e9, "all_bandwidth_GBps": [b / 1e9 for b in bw_runs], "rows": rows, "load_average_before": load_before,
                      "load_average_after": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
