"""Quantize on load, stowage vs Transformers + bitsandbytes, side by side in one run.

    /opt/stowage-tools-venv/bin/python bench/quantize_load_side_by_side.py \
        --bench build-qload-rel/bench/quantize_load_bench

1. Makes (once) a ~1.9 GB sharded float16 checkpoint with transformers: the Llama config of
   bench/load_side_by_side.py (hidden 1536, intermediate 4096, vocab 32000, untied) with 30
   layers (~950M parameters), random init, save_pretrained(max_shard_size="500MB") into
   /tmp/stowage-qload-bench (never committed).
2. Warms the page cache, then measures, each in a fresh child process under /usr/bin/time -v
   (peak RSS of the child):
     - stowage: load_checkpoint_and_dispatch(device_map {"": "cpu"}, dtype float16,
       quantization nf4 [double quant]) (bench/quantize_load_bench.cpp);
     - Transformers: AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float16,
       device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True,
       bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=fp16)).
   Each load is repeated --repeat times; the best time and the highest peak RSS are reported.
3. Prints a Markdown table and a JSON summary (target: stowage peak RSS <= quantized model +
   256 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys

from bench_util import timed, warm  # shared with the other side-by-side scripts

CKPT = "/tmp/stowage-qload-bench"


def make_checkpoint(path: str) -> None:
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=30,
                                   num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.set_default_dtype(torch.float16)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.dtype = "float16"
    model.save_pretrained(path, max_shard_size="500MB")


TRANSFORMERS_CHILD = r"""
import json, sys, time, resource, os, logging
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.disable(logging.WARNING)
import torch, transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
path, threads, dq = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(threads)
import bitsandbytes as bnb
try:  # the bitsandbytes CPU repacking path that crashes here (tools/check_quantized_load.py)
    import bitsandbytes.backends.cpu.ops as cpu_ops
    cpu_ops.support_avx512bf16_for_cpu = False
except Exception:
    pass
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                       bnb_4bit_compute_dtype=torch.float16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu", quantization_config=q)
secs = time.perf_counter() - t0
n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"mode": "transformers", "seconds": secs, "resident_bytes": n, "peak_rss_kib_before": before,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "bitsandbytes": bnb.__version__}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="path to the quantize_load_bench executable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--checkpoint", default=CKPT)
    ap.add_argument("--skip-transformers", action="store_true")
    a = ap.parse_args()

    make_checkpoint(a.checkpoint)
    size = warm(a.checkpoint)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = re.search(r"Model name:\s*(.*)", cpu).group(1).strip()
    st_cmd = [a.bench, a.checkpoint, "--quant", "nf4", "--dtype", "float16", "--threads", str(a.threads)]
    if a.double_quant:
        st_cmd.append("--double-quant")
    st_runs, tf_runs, tf_error = [], [], None
    load_avg = [os.getloadavg()]
    for _ in range(a.repeat):
        warm(a.checkpoint)
        st_runs.append(timed(st_cmd))
        if not a.skip_transformers and tf_error is None:
            warm(a.checkpoint)
            try:
                tf_runs.append(timed([sys.executable, "-c", TRANSFORMERS_CHILD, a.checkpoint, str(a.threads),
                                      "1" if a.double_quant else "0"]))
            except SystemExit as e:  # report, do not hide, a failing peer
                tf_error = str(e)[-2000:]
        load_avg.append(os.getloadavg())
    st = min(st_runs, key=lambda r: r[0]["seconds"])[0]
    st_rss = max(r[1] for r in st_runs)
    resident = st["resident_bytes"]
    summary = {
        "machine": {"cpu": model_name, "cpus": os.cpu_count(), "kernel": platform.release(),
                    "load_average_1_5_15": load_avg},
        "checkpoint": {"path": a.checkpoint, "file_bytes": size, "tensor_bytes": st["bytes_read"], "dtype": "float16"},
        "threads": a.threads,
        "double_quant": a.double_quant,
        "stowage": {"seconds": st["seconds"], "peak_rss_mib": st_rss / 1024, "resident_mib": resident / 2**20,
                    "rss_over_resident_mib": st_rss / 1024 - resident / 2**20,
                    "quantized_weights": st["quantized_weights"],
                    "quantize_gbps_fp16_in": st["quantize_gbps"],
                    "quantize_melem_per_s": st["quantized_elements"] / st["seconds"] / 1e6,
                    "checkpoint_gbps": st["bytes_read"] / st["seconds"] / 1e9,
                    "all_seconds": [r[0]["seconds"] for r in st_runs]},
    }
    if tf_runs:
        tf = min(tf_runs, key=lambda r: r[0]["seconds"])[0]
        tf_rss = max(r[1] for r in tf_runs)
        summary["transformers"] = {"seconds": tf["seconds"], "peak_rss_mib": tf_rss / 1024,
                                   "resident_mib": tf["resident_bytes"] / 2**20,
                                   "rss_before_load_mib": tf["peak_rss_kib_before"] / 1024,
                                   "versions": tf["versions"],
                                   "all_seconds": [r[0]["seconds"] for r in tf_runs]}
        summary["speedup"] = tf["seconds"] / st["seconds"]
    if tf_error:
        summary["transformers_error"] = tf_error
    print(json.dumps(summary, indent=1))
    print()
    print("| | time (s) | peak RSS (MiB) | resident model (MiB) | peak RSS - resident (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| stowage | {st['seconds']:.3f} | {st_rss/1024:.0f} | {resident/2**20:.0f} | "
          f"{st_rss/1024 - resident/2**20:.0f} |")
    if tf_runs:
        print(f"| Transformers + bitsandbytes | {tf['seconds']:.3f} | {tf_rss/1024:.0f} | "
              f"{tf['resident_bytes']/2**20:.0f} | {tf_rss/1024 - tf['resident_bytes']/2**20:.0f} |")
    print(f"\nstowage quantizes {summary['stowage']['quantize_melem_per_s']:.0f} M elements/s "
          f"({summary['stowage']['quantize_gbps_fp16_in']:.2f} GB/s of fp16 input)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
