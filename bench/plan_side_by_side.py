#!/usr/bin/env python3
"""Planning speed, stowage vs accelerate (and Transformers for "auto"), in one run on one machine.

Times accelerate's get_balanced_memory + infer_auto_device_map ("balanced") or
infer_auto_device_map alone ("sequential"), and Transformers v5's from_pretrained resolver
(transformers.integrations.accelerate._get_device_map, "auto"), on meta-device Transformers
models built from examples/configs/*, best of N wall-clock runs; and stowage's plan_bench
(Google Benchmark) on the same structures and budgets, in three forms, best of 5 Google Benchmark
repetitions: from the tree (infer_device_map(tree, ...) on a tree planned before: the tree keeps
its index and size tables, module_tree::derived, as a torch model keeps its modules), the first
plan of a tree (a fresh copy each time: the index and size tables built in the call, as
accelerate recomputes compute_module_sizes on every call) and through a reused plan_context. Prints both ratios and
the load average before and after (the machine is shared: rerun when it is idle).

usage: /opt/stowage-tools-venv/bin/python bench/plan_side_by_side.py BUILD_DIR [REPEAT]
"""
import json
import logging
import os
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B70 = {0: "40GB", 1: "40GB", 2: "40GB", 3: "40GB", "cpu": "400GB"}
B405 = {i: "80GB" for i in range(8)} | {"cpu": "1000GB"}
# (config, bench name, strategy, budgets, peer)
CASES = [
    ("Llama-2-70b-hf", "llama2_70b_balanced", "balanced", B70, "accelerate"),
    ("Llama-2-70b-hf", "llama2_70b_sequential", "sequential", B70, "accelerate"),
    ("Llama-3.1-405B", "llama31_405b_balanced", "balanced", B405, "accelerate"),
    ("Llama-2-70b-hf", "llama2_70b_auto", "auto", B70, "transformers"),
]


def build_model(config):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(os.path.join(ROOT, "examples", "configs", config))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.tie_weights()
    return model


def time_peer(model, strategy, budgets, peer, repeat):
    import torch
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers.integrations import accelerate as tfa

    ns = ["LlamaDecoderLayer"]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        if peer == "transformers":
            tfa._get_device_map(model, strategy, dict(budgets), None)
        else:
            mm = dict(budgets)
            if strategy != "sequential":
                mm = get_balanced_memory(model, mm, no_split_module_classes=ns, dtype=torch.bfloat16)
            infer_auto_device_map(model, max_memory=mm, no_split_module_classes=ns, dtype=torch.bfloat16)
        best = min(best, time.perf_counter() - t0)
    return best


def time_stowage(build_dir, exe_name="plan_bench"):
    """Best (minimum) wall time per benchmark over 5 repetitions, as accelerate's best of N."""
    exe = os.path.join(build_dir, "bench", exe_name)
    out = subprocess.run([exe, "--benchmark_format=json", "--benchmark_min_time=0.2",
                          "--benchmark_repetitions=5"],
                         check=True, capture_output=True, text=True).stdout
    res = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        key = b["run_name"].split("/")[1]
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        res[key] = min(res.get(key, float("inf")), b["real_time"] * unit)
    return res


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build-bench")
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    warnings.simplefilter("ignore")
    for n in ("accelerate", "transformers"):
        logging.getLogger(n).setLevel(logging.ERROR)
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    stowage = time_stowage(build)
    models = {}
    rows = []
    for config, bench, strategy, budgets, peer in CASES:
        if config not in models:
            models[config] = build_model(config)
        peer_s = time_peer(models[config], strategy, budgets, peer, repeat)
        rows.append((bench, peer, peer_s, stowage[bench], stowage[bench + "_first"],
                     stowage[bench + "_ctx"]))
    print(f"{'case':24} {'peer':>12} {'peer time':>10} {'stowage':>10} {'x':>6} "
          f"{'first plan':>11} {'x':>6} {'stowage ctx':>12} {'x':>6}")
    for bench, peer, p, s, f, c in rows:
        print(f"{bench:24} {peer:>12} {p * 1e3:8.2f}ms {s * 1e6:8.1f}us {p / s:6.0f} "
              f"{f * 1e6:9.1f}us {p / f:6.0f} {c * 1e6:10.1f}us {p / c:6.0f}")
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
