#!/usr/bin/env python3
"""Planning speed, stowage vs accelerate, in one run on one machine.

Times accelerate's infer_auto_device_map (with get_balanced_memory for "balanced") on
meta-device Transformers models built from examples/configs/*, and stowage's plan_bench
(Google Benchmark) on the same structures and budgets, then prints the ratio.

usage: /opt/stowage-tools-venv/bin/python bench/plan_side_by_side.py BUILD_DIR
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("Llama-2-70b-hf", "llama2_70b_balanced", "balanced",
     {0: "40GB", 1: "40GB", 2: "40GB", 3: "40GB", "cpu": "400GB"}),
    ("Llama-2-70b-hf", "llama2_70b_sequential", "sequential",
     {0: "40GB", 1: "40GB", 2: "40GB", 3: "40GB", "cpu": "400GB"}),
    ("Llama-3.1-405B", "llama31_405b_balanced", "balanced",
     {i: "80GB" for i in range(8)} | {"cpu": "1000GB"}),
]


def time_accelerate(config, strategy, budgets, repeat=5):
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(os.path.join(ROOT, "examples", "configs", config))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    ns = ["LlamaDecoderLayer"]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        mm = dict(budgets)
        if strategy != "sequential":
            mm = get_balanced_memory(model, mm, no_split_module_classes=ns, dtype=torch.bfloat16)
        infer_auto_device_map(model, max_memory=mm, no_split_module_classes=ns, dtype=torch.bfloat16)
        best = min(best, time.perf_counter() - t0)
    return best


def time_stowage(build_dir):
    exe = os.path.join(build_dir, "bench", "plan_bench")
    out = subprocess.run([exe, "--benchmark_format=json", "--benchmark_min_time=0.2"],
                         check=True, capture_output=True, text=True).stdout
    res = {}
    for b in json.loads(out)["benchmarks"]:
        name = b["name"].split("/")[0].split(" ")[0]
        key = name.split("plan<")[-1].split(">/")[-1] if ">/" in name else name
        key = b["name"].split("/")[1] if "/" in b["name"] else key
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        res[key] = b["real_time"] * unit
    return res


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build-bench")
    stowage = time_stowage(build)
    print(f"{'case':28} {'accelerate':>12} {'stowage':>12} {'speed-up':>10}")
    for config, bench, strategy, budgets in CASES:
        acc = time_accelerate(config, strategy, budgets)
        sw = stowage[bench]
        print(f"{bench:28} {acc * 1e3:10.2f}ms {sw * 1e6:10.1f}us {acc / sw:9.0f}x")


if __name__ == "__main__":
    main()
