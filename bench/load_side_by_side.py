"""Checkpoint loading, stowage vs accelerate, side by side in one run on one machine.

    /opt/stowage-tools-venv/bin/python bench/load_side_by_side.py --bench build-rel/bench/load_bench

1. Makes (once) a ~2 GB sharded float32 checkpoint with transformers: a Llama config sized to
   ~500M parameters, random init, save_pretrained(max_shard_size="500MB") into
   /tmp/stowage-load-bench (never committed).
2. Warms the page cache (reads every file once), then measures in this order, each in a fresh
   child process under /usr/bin/time -v (peak RSS):
     - memcpy bandwidth of this machine (load_bench --memcpy, same thread count): into warm
       (already faulted-in) buffers, the reference, and into fresh memory (4 KiB pages and
       MADV_HUGEPAGE), page faults included;
     - stowage: load_checkpoint_and_dispatch(device_map {"": "cpu"}, dtype bfloat16), with
       transparent huge pages (the default) and with --thp 0;
     - accelerate: load_checkpoint_and_dispatch(model, dir, device_map={"": "cpu"},
       dtype=torch.bfloat16) on a model built under init_empty_weights.
   Every load is repeated --repeat times; the best time and the highest peak RSS are reported,
   and every time is listed. The 1-minute load average is printed before and after (the
   numbers mean little on a busy machine).
   Also, once: load_bench --phases (the load's physical pieces alone: reading every file once,
   faulting in fresh huge pages for the bf16 output, and the share of the checkpoint the page
   cache holds in 2 MiB folios), whose sum is the floor no loader of these files goes below.
3. Prints a Markdown table and a JSON summary (targets: >= 3x faster than accelerate, >= 60% of
   memcpy bandwidth, peak RSS <= resident weights + 256 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

from bench_util import timed, warm  # shared with the other side-by-side scripts

CKPT = "/tmp/stowage-load-bench"


def make_checkpoint(path: str) -> None:
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=14,
                                   num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False,
                                   torch_dtype="float32")
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="500MB")


ACCELERATE_CHILD = r"""
import json, sys, time, resource, os
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch, transformers
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
path = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))
cfg = transformers.AutoConfig.from_pretrained(path)
with init_empty_weights():
    model = transformers.LlamaForCausalLM(cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, dtype=torch.bfloat16)
secs = time.perf_counter() - t0
n = sum(p.numel() * p.element_size() for p in model.state_dict().values())
print(json.dumps({"mode": "accelerate", "seconds": secs, "resident_bytes": n, "peak_rss_kib_before": before,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="path to the load_bench executable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--checkpoint", default=CKPT)
    a = ap.parse_args()

    make_checkpoint(a.checkpoint)
    size = warm(a.checkpoint)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = re.search(r"Model name:\s*(.*)", cpu).group(1).strip()
    ncpu = os.cpu_count()

    load_before = os.getloadavg()[0]
    mem, _ = timed([a.bench, "--memcpy", str(1 << 30), "--threads", str(a.threads)])
    # The physical pieces of the load, each alone (reading the checkpoint, faulting in the
    # bf16 destination), and how much of the page cache sits in 2 MiB folios.
    phases, _ = timed([a.bench, "--phases", a.checkpoint, "--threads", str(a.threads)])
    floor = min(phases["read_mapped_seconds"], phases["read_pread_seconds"]) + phases["fault_half_seconds"]
    st_runs, st4k_runs, acc_runs = [], [], []
    for _ in range(a.repeat):
        warm(a.checkpoint)
        st_runs.append(timed([a.bench, a.checkpoint, "--dtype", "bfloat16", "--threads", str(a.threads)]))
        warm(a.checkpoint)
        st4k_runs.append(timed([a.bench, a.checkpoint, "--dtype", "bfloat16", "--threads", str(a.threads),
                                "--thp", "0"]))
        warm(a.checkpoint)
        acc_runs.append(timed([sys.executable, "-c", ACCELERATE_CHILD, a.checkpoint, str(a.threads)]))
    st = min(st_runs, key=lambda r: r[0]["seconds"])[0]
    st_rss = max(r[1] for r in st_runs)
    st4k = min(st4k_runs, key=lambda r: r[0]["seconds"])[0]
    st4k_rss = max(r[1] for r in st4k_runs)
    acc = min(acc_runs, key=lambda r: r[0]["seconds"])[0]
    acc_rss = max(r[1] for r in acc_runs)
    # The checkpoint's tensor bytes (what both read), GB/s on those.
    read = st["bytes_read"]
    st_gbps = read / st["seconds"] / 1e9
    st4k_gbps = read / st4k["seconds"] / 1e9
    acc_gbps = read / acc["seconds"] / 1e9
    resident = st["resident_bytes"]
    summary = {
        "machine": {"cpu": model_name, "cpus": ncpu, "kernel": platform.release()},
        "checkpoint": {"path": a.checkpoint, "file_bytes": size, "tensor_bytes": read, "tensors": st["tensors"]},
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "memcpy_gbps": mem["gbps"],
        "memcpy_fresh_gbps": mem["fresh_gbps"],
        "memcpy_fresh_huge_gbps": mem["fresh_huge_gbps"],
        "stowage": {"seconds": st["seconds"], "gbps": st_gbps, "peak_rss_mib": st_rss / 1024,
                    "resident_mib": resident / 2**20, "all_seconds": [r[0]["seconds"] for r in st_runs]},
        "stowage_4k_pages": {"seconds": st4k["seconds"], "gbps": st4k_gbps, "peak_rss_mib": st4k_rss / 1024,
                             "all_seconds": [r[0]["seconds"] for r in st4k_runs]},
        "accelerate": {"seconds": acc["seconds"], "gbps": acc_gbps, "peak_rss_mib": acc_rss / 1024,
                       "rss_before_load_mib": acc["peak_rss_kib_before"] / 1024,
                       "resident_mib": acc["resident_bytes"] / 2**20,
                       "all_seconds": [r[0]["seconds"] for r in acc_runs]},
        "speedup": acc["seconds"] / st["seconds"],
        "fraction_of_memcpy": st_gbps / mem["gbps"],
        "fraction_of_memcpy_4k_pages": st4k_gbps / mem["gbps"],
        "stowage_rss_over_resident_mib": st_rss / 1024 - resident / 2**20,
        "phases": phases,
        "page_cache_pmd_fraction": phases["pmd_mapped_bytes"] / phases["bytes"],
        "floor_seconds": floor,
        "floor_fraction_of_memcpy": read / floor / 1e9 / mem["gbps"],
        "threads": a.threads,
    }
    print(json.dumps(summary, indent=1))
    print()
    print("| | time (s) | GB/s (checkpoint bytes) | peak RSS (MiB) | resident weights (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| stowage | {st['seconds']:.3f} | {st_gbps:.2f} | {st_rss/1024:.0f} | {resident/2**20:.0f} |")
    print(f"| stowage, --thp 0 (4 KiB pages) | {st4k['seconds']:.3f} | {st4k_gbps:.2f} | {st4k_rss/1024:.0f} | {resident/2**20:.0f} |")
    print(f"| accelerate | {acc['seconds']:.3f} | {acc_gbps:.2f} | {acc_rss/1024:.0f} | {acc['resident_bytes']/2**20:.0f} |")
    print(f"| memcpy ({a.threads} threads), warm buffers | | {mem['gbps']:.2f} | | |")
    print(f"| memcpy into fresh memory, 4 KiB / huge pages | | {mem['fresh_gbps']:.2f} / {mem['fresh_huge_gbps']:.2f} | | |")
    print(f"| floor: read the checkpoint once (best of mapping / pread) + fault in the bf16 destination | {floor:.3f} | {read / floor / 1e9:.2f} | | |")
    print()
    print(f"Page cache: {phases['pmd_mapped_bytes'] / phases['bytes']:.0%} of the checkpoint maps as 2 MiB pages; "
          f"stowage = {st_gbps / mem['gbps']:.0%} of warm memcpy, {floor / st['seconds']:.0%} of the floor's speed; "
          f"{acc['seconds'] / st['seconds']:.1f}x accelerate.")
    print(f"\nload average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"speedup {summary['speedup']:.2f}x, {100*summary['fraction_of_memcpy']:.0f}% of memcpy "
          f"({100*summary['fraction_of_memcpy_4k_pages']:.0f}% with 4 KiB pages), "
          f"stowage peak RSS - resident = {summary['stowage_rss_over_resident_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
